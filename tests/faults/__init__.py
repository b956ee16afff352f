"""The reliability harness (marker ``faults``); a package so that its
conftest and modules never clash with the suite's own by name."""
