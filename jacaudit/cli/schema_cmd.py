"""``jacaudit schema [KIND]``: print the JSON Schema of a report (stdout)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import handle_errors


def register(app: typer.Typer) -> None:
    @app.command("schema")
    def schema_cmd(
        kind: Annotated[Optional[str], typer.Argument(help="Report kind (command), e.g. saliency. Omit for the "
                                                      "schema of any report.")] = None,
        list_kinds: Annotated[bool, typer.Option("--list", help="List the known report kinds.")] = False,
    ) -> None:
        """Print the JSON Schema (draft 2020-12) that every report of KIND validates against."""
        import json
        import sys

        from ..results import result_types, schema

        with handle_errors():
            if list_kinds:
                sys.stdout.write("\n".join(result_types()) + "\n")
                return
            sys.stdout.write(json.dumps(schema(kind), indent=2) + "\n")
