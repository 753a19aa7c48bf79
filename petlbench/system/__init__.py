"""Where petlbench meets the operating system, standard library only (children import it before anything else):
files written inside a folder without following links (`safeio`), a results folder's ledger of rows (`ledger`),
and the launcher that ties a child process to its parent's life (`launch`)."""
