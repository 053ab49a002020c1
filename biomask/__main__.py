from biomask.cli import entry

entry()
