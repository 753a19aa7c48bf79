"""The command line: `app` (the Typer commands), `console` (output, errors, progress), `tables` (Rich renderings).

Commands parse their arguments, call one core function and render what it returns; the core never prints.
"""
