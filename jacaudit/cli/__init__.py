"""The Typer command-line interface. Glue only: parse options, call one library function, render, map errors."""
