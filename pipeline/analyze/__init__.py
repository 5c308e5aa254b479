"""``scalecert analyze``: its options and its run (in this process, no Ray)."""
