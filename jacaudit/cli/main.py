"""``jacaudit`` entry point. Each command lives in its own module with a ``register(app)`` function.

Command modules must not import torch at module level (``jacaudit --help`` stays light).
"""
from __future__ import annotations

from enum import Enum
from importlib import import_module
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from .. import __version__
from .common import state


class RuntimeMode(str, Enum):
    """--runtime: where an ONNX model's values and input gradients are computed."""

    auto = "auto"
    onnxruntime = "onnxruntime"
    torch = "torch"


class _OneLineErrors(TyperGroup):
    """click's usage errors (unknown option, bad value, missing argument) as ONE line on stderr, exit 2 -- not
    the three lines Usage / Try / Error -- like every other jacaudit error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        import sys

        try:
            from typer import _click as click  # typer vendors click
        except ImportError:  # pragma: no cover - older typer
            import click
        # click's Abort (Ctrl-C at a prompt); the click that some typer releases vendor has none
        abort = getattr(click.exceptions, "Abort", None) or getattr(click, "Abort", None)
        aborts = (abort,) if isinstance(abort, type) else ()
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.ClickException as e:
            from .common import err

            msg = " ".join(ln.strip() for ln in e.format_message().splitlines() if ln.strip())
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if isinstance(e, click.exceptions.UsageError) and ctx \
                else ""
            err.print(f"error: {msg}{hint}", style="bold red", markup=False)
            sys.exit(e.exit_code)
        except aborts:
            from .common import err

            err.print("error: aborted", style="bold red", markup=False)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="jacaudit",
    help="Audit neural networks (ONNX, TorchScript) for robustness and interpretability through their Jacobians.\n\n"
         "Exit codes: 0 pass, 1 a check failed, 2 usage or input error, 3 runtime failure, 4 inconclusive (no "
         "evidence for a verdict).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Command modules, in the order of the help listing.
COMMANDS = ("inspect_cmd", "saliency_cmd", "robustness_cmd", "transfer_cmd", "jacobian_cmd", "geometry_cmd", "gradflow_cmd", "verify_cmd",
            "render_cmd", "schema_cmd", "ops_cmd")

for _mod in COMMANDS:
    import_module(f"{__package__}.{_mod}").register(app)


def _version(value: bool) -> None:
    if value:
        print(f"jacaudit {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Torch CPU threads (default: 1 on <=2 free "
                                                   "cores, else up to 8; env JACAUDIT_THREADS).", min=1)] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    config: Annotated[Optional[str], typer.Option("--config", help="Config file (default: the nearest "
                      "jacaudit.toml, or pyproject.toml with [tool.jacaudit]).")] = None,
    model_arg: Annotated[Optional[list[str]], typer.Option(
        "--model-arg", help="Extra argument passed after the tensor inputs to a TorchScript forward that takes "
                            "non-tensor arguments (e.g. a sample rate); repeat for several; int, float, "
                            "true/false or text.")] = None,
    runtime: Annotated[Optional[RuntimeMode], typer.Option(
        "--runtime", case_sensitive=False,
        help="ONNX models: 'onnxruntime' computes values and input gradients in onnxruntime (a backward graph "
             "jacaudit writes) where the graph allows; 'auto' (default) does so for gradients of batches up to "
             "8 inputs; 'torch' runs everything in jacaudit's torch interpreter. Graphs with Loop/Scan on the "
             "differentiated path, float64, non-CPU devices and torch.func transforms run the interpreter anyway "
             "(env JACAUDIT_RUNTIME; config file: runtime = \"...\" at the top level).")] = None,
) -> None:
    from .. import config as cfg
    from .common import handle_errors

    state.debug = debug
    with handle_errors():
        # CLI > environment > config file > defaults (see jacaudit/config.py)
        path = config or cfg.find_config()
        file_cfg = dict(cfg.read_config(path)) if path is not None else {}
        cfg_runtime = file_cfg.pop("runtime", None)  # a global option (like --threads), not a command's
        commands = getattr(ctx.command, "commands", {})
        from .options import SHARED_KEYS

        ctx.default_map = cfg.default_map(file_cfg, commands, shared=SHARED_KEYS)
        state.config_path = str(path) if path is not None else None
        from .common import resolve_runtime

        state.runtime = resolve_runtime(runtime.value if runtime is not None else None, cfg_runtime,
                                        state.config_path)
    state.quiet = quiet
    state.threads = threads
    from .common import parse_model_arg

    state.model_args = tuple(parse_model_arg(a) for a in model_arg or ())


def main() -> None:
    import sys

    try:
        app(standalone_mode=True)
    except SystemExit as e:
        code = e.code
        # click uses 2 for usage errors already; keep it.
        sys.exit(code if isinstance(code, int) else (0 if code is None else 2))


if __name__ == "__main__":
    main()
