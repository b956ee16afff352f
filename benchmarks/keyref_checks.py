"""What checking foreign keys to keyed models costs when applying: orders
pointing at a shared currency by its code, against orders pointing at a
shared integer-keyed category through ``refs``, and orders pointing at
nothing, in one run:

    .venv/bin/python benchmarks/keyref_checks.py [--records N] [--targets T]
        [--db sqlite|postgresql|mysql]

Central creates and publishes T currencies and T categories and carries
them to the facade; then, per kind of order, N orders (spread over the T
targets) are published on central and *pushed* (creates), then edited on
the facade and *pulled* back (updates), as ``keyed_throughput.py`` does:
no HTTP, only publishing and applying.  Databases as in
``sync_throughput.py``; a warm-up round of 200 orders runs first.  Figures
are from one run on a possibly shared machine: compare the ratios.
Never used as a test.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from keyed_throughput import App, BenchBase, carry
from sqlalchemy import ForeignKey, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column
from sync_throughput import Databases

from pyramid_communicator import receives_from
from pyramid_communicator.publishing import publish_records


@receives_from('bench_currency')
class Currency(BenchBase):
    __tablename__ = 'bench_currencies'
    code: Mapped[str] = mapped_column(String(8), primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


@receives_from('bench_category')
class Category(BenchBase):
    __tablename__ = 'bench_categories'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


@receives_from('bench_plain_order')
class PlainOrder(BenchBase):
    __tablename__ = 'bench_plain_orders'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))


@receives_from('bench_category_order')
class CategoryOrder(BenchBase):
    __tablename__ = 'bench_category_orders'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    category_id: Mapped[int] = mapped_column(ForeignKey('bench_categories.id'))


@receives_from('bench_currency_order')
class CurrencyOrder(BenchBase):
    __tablename__ = 'bench_currency_orders'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    currency_code: Mapped[str] = mapped_column(ForeignKey('bench_currencies.code'))


KINDS = {'no foreign key': PlainOrder, 'integer target (refs)': CategoryOrder,
         'keyed target (key)': CurrencyOrder}


def targets(central: App, facade: App, count: int) -> list[int]:
    tm, session = central.session()
    with tm:
        records = [Currency(code=f'C{i}', name=f'c{i}') for i in range(count)] + \
            [Category(name=f'k{i}') for i in range(count)]
        session.add_all(records)
        session.flush()
        publish_records(session, records)
        categories = [r.id for r in records if isinstance(r, Category)]
    session.close()
    carry(central, facade)
    return categories


def run(cls: type, central: App, facade: App, count: int,
        categories: list[int]) -> dict[str, float]:
    tm, session = central.session()
    with tm:
        records = []
        for i in range(count):
            record = cls(title=f't{i}')
            if cls is CategoryOrder:
                record.category_id = categories[i % len(categories)]
            elif cls is CurrencyOrder:
                record.currency_code = f'C{i % len(categories)}'
            records.append(record)
        session.add_all(records)
        session.flush()
        publish_records(session, records)
    session.close()
    pushed = carry(central, facade)
    tm, session = facade.session()
    with tm:
        records = session.scalars(select(cls)).all()
        for record in records:
            record.title = record.title + ' edited'
        session.flush()
        publish_records(session, records)
    session.close()
    pulled = carry(facade, central)
    return {'push': pushed, 'pull': pulled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--records', type=int, default=2000)
    parser.add_argument('--targets', type=int, default=50)
    parser.add_argument('--db', choices=['sqlite', 'postgresql', 'mysql'], default='sqlite')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        databases = Databases(args.db, Path(tmp))
        try:
            engines = [databases.engine(databases.create(label))
                       for label in ('central', 'facade')]
            for count in (200, args.records):  # a warm-up round, then the measured one
                central, facade = App('central', engines[0]), App('facade', engines[1])
                try:
                    categories = targets(central, facade, args.targets)
                    figures = {kind: run(cls, central, facade, count, categories)
                               for kind, cls in KINDS.items()}
                finally:
                    central.drop()
                    facade.drop()
        finally:
            databases.drop_all()
    print(f'{args.records} orders over {args.targets} targets, {args.db}')
    base = figures['no foreign key']
    print(f'{"":24}{"push r/s":>10}{"x plain":>9}{"pull r/s":>10}{"x plain":>9}')
    for kind, found in figures.items():
        print(f'{kind:24}{args.records / found["push"]:>10.0f}'
              f'{found["push"] / base["push"]:>9.2f}'
              f'{args.records / found["pull"]:>10.0f}{found["pull"] / base["pull"]:>9.2f}')


if __name__ == '__main__':
    main()
