"""The demo's message handlers: the contact form, end to end.

The facade's ``POST /contact`` keeps the visitor's message and sends
``contact.submitted``; central's handler keeps it as received and answers
``contact.acknowledged``, whose handler on the facade marks the visitor's
copy.  Each handler writes through ``message.session``: what it writes
commits with the message's applied mark, once.
"""
from __future__ import annotations

from pyramid_communicator import message_handler, send

from .models import ContactRequest


@message_handler('contact.submitted', accept_from='facade')
def contact_submitted(message) -> None:
    """Central: keep the request, and tell the facade it arrived.

    A real app would mail its staff here (``pyramid_mailer``'s transactional
    ``get_mailer(message.registry).send(...)``, see docs/messages.rst)."""
    payload = message.payload
    message.session.add(ContactRequest(
        name=payload['name'], email=payload['email'], text=payload['text'],
        status='received', origin=message.origin, message_id=message.id,
        ref=payload['ref']))
    send(message.session, 'contact.acknowledged', {'ref': payload['ref']})


@message_handler('contact.acknowledged', accept_from='central')
def contact_acknowledged(message) -> None:
    """Facade: central has the request."""
    request = message.session.get(ContactRequest, message.payload['ref'])
    if request is None:
        raise LookupError(f'no contact request {message.payload["ref"]!r} here')
    request.status = 'acknowledged'
