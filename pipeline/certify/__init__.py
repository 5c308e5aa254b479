"""``scalecert certify``: its worker (certificate rows) and its run on the shared driver."""
