"""``jacaudit render REPORT.json -o OUT``: rebuild HTML / Markdown from a JSON report alone."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..report import formats_help
from .common import handle_errors, info


def register(app: typer.Typer) -> None:
    @app.command("render")
    def render_cmd(
        report: Annotated[Path, typer.Argument(help="A JSON report written by jacaudit.")],
        output: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file; the format follows "
                                                       "its extension (.html, .md, .json, .junit.xml, .sarif). '-' "
                                                       "for stdout.")] = None,
        fmt: Annotated[Optional[str], typer.Option("--format", "-f", help=f"{formats_help()} (overrides the "
                                                   "extension).")] = None,
        validate: Annotated[bool, typer.Option("--validate/--no-validate", help="Check the JSON against the "
                                               "schema first (needs the jsonschema package).")] = False,
    ) -> None:
        """Render a JSON report as a self-contained HTML page or a Markdown summary."""
        import json
        import sys

        from ..errors import InputError
        from ..report import render, write_atomic
        from ..results import from_dict

        with handle_errors():
            try:
                data = json.loads(report.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise InputError(f"{report}: no such file") from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"{report}: not a JSON report ({str(e).splitlines()[0]})") from None
            if validate:
                try:
                    from ..results import validate as _validate
                    _validate(data)
                except ImportError:
                    raise InputError("--validate needs the jsonschema package") from None
                except Exception as e:  # jsonschema.ValidationError
                    raise InputError(f"{report}: does not match the schema: {getattr(e, 'message', e)}") from None
            try:
                rep = from_dict(data)
            except (ValueError, TypeError, KeyError) as e:
                raise InputError(f"{report}: not a valid jacaudit report ({e})") from None
            if fmt is None:
                from ..report import format_for_path
                fmt = format_for_path(str(output)) if output and str(output) != "-" else "html"
                if fmt is None:
                    raise InputError(f"cannot tell the format from {output}; pass --format ({formats_help()})")
            if output is not None and str(output) != "-":
                from .runner import check_file_writable
                check_file_writable(output, "--out")
            data_out = render(rep, fmt)
            if output is None or str(output) == "-":
                sys.stdout.buffer.write(data_out)
                sys.stdout.flush()
            else:
                write_atomic(output, data_out)
                info(f"wrote {output}")
