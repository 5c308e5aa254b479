"""``scalecert attack``: its options, its worker (attack rows) and its run on the shared driver."""
