"""``jacaudit ops``: the ONNX operators the interpreter implements, read from its registry (stdout).

Per domain and operator: the opsets a model may declare for it, the ONNX versions of the operator those opsets
mean (the schema's since-versions, from the onnx package), the interpreter's own implementations (the registry's
since-versions: one function serves every ONNX version from its ``since`` up to the next one), the inputs the
ONNX schema tags as differentiable, and notes (deprecated in ONNX, defined only above the loadable opsets).
Then the operators refused on purpose (the registry's ``OUT_OF_SCOPE``, with the reason) and the ONNX operators
not implemented. ``--json`` prints the same as data. Needs no model; nothing is computed.

The README's "Supported ONNX operators" block is generated from :func:`collect` (``scripts/gen_readme_ops.py``).
"""
from __future__ import annotations

from typing import Annotated, Any

import typer

from .common import handle_errors

#: the name the reports use for the default domain
DEFAULT = "ai.onnx"


def _domain_name(domain: str) -> str:
    return domain or DEFAULT


def _schemas() -> dict[tuple[str, str], list[Any]]:
    """Every ONNX schema version the onnx package knows, by (domain, op), oldest first."""
    from onnx import defs

    by: dict[tuple[str, str], list[Any]] = {}
    for s in defs.get_all_schemas_with_history():
        by.setdefault((s.domain if s.domain != DEFAULT else "", s.name), []).append(s)
    for v in by.values():
        v.sort(key=lambda s: s.since_version)
    return by


def _domain_ranges() -> dict[str, tuple[int, int]]:
    """The opsets of each domain a model may declare: the default domain's from the loader's check
    (jacaudit.models.validate), the others' as far as the onnx package defines them."""
    from onnx import defs

    from ..models.validate import MAX_OPSET, MIN_OPSET

    ranges = {d: (int(lo), int(hi)) for d, (lo, hi) in defs.C.schema_version_map().items() if d != DEFAULT}
    ranges[""] = (MIN_OPSET, MAX_OPSET)
    return ranges


def _differentiable_inputs(schema) -> list[str] | None:
    """Input names the schema tags Differentiable; None where it tags none either way (not known)."""
    from onnx.defs import OpSchema

    cat = OpSchema.DifferentiationCategory
    tags = [(i.name, i.differentiation_category) for i in schema.inputs]
    if tags and all(c == cat.Unknown for _, c in tags):
        return None
    return [n for n, c in tags if c == cat.Differentiable]


def _ranges(values: list[int]) -> list[list[int]]:
    """Sorted ints as [first, last] runs: [7, 8, 9, 11] -> [[7, 9], [11, 11]]."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return runs


def _op_entry(domain: str, op_type: str, since: list[int], schemas: list[Any], lo: int, hi: int) -> dict:
    """One operator: the loadable opsets lo..hi at which ONNX defines it (deprecated versions included: they
    are run, and said so in the notes), the ONNX versions in effect there, the registry's since-versions, the
    schema's differentiable inputs, notes."""
    notes: list[str] = []
    in_effect = {}  # opset -> the schema version in effect there
    for v in range(lo, hi + 1):
        older = [s for s in schemas if s.since_version <= v]
        if older:
            in_effect[v] = older[-1]
    dead = [v for v, s in in_effect.items() if s.deprecated]
    versions = sorted({s.since_version for s in in_effect.values()})
    if dead:
        notes.append("deprecated in ONNX at opset(s) " + ", ".join(_range(r) for r in _ranges(dead))
                     + " (still run)")
    if not in_effect:
        versions = [s.since_version for s in schemas]
        notes.append(f"ONNX defines it from opset {versions[0]}, above the loadable {lo}-{hi}" if versions
                     else "not in the ONNX standard")
    live = [s for s in in_effect.values() if not s.deprecated]
    ref = (live or list(in_effect.values()) or schemas or [None])[-1]
    return {"domain": _domain_name(domain), "op_type": op_type, "opsets": _ranges(sorted(in_effect)),
            "onnx_versions": versions, "since": since,
            "differentiable_inputs": _differentiable_inputs(ref) if ref is not None else None, "notes": notes}


def collect() -> dict[str, Any]:
    """The supported, refused and missing ONNX operators, as plain data (the ``--json`` output)."""
    import onnx

    from .. import __version__
    from ..models.onnx import ops as _ops  # noqa: F401  (importing the package registers every op)
    from ..models.onnx import registry

    schemas = _schemas()
    ranges = _domain_ranges()
    operators = []
    for (domain, op_type), impls in sorted(registry._REGISTRY.items(), key=lambda kv: (kv[0][0] != "", kv[0])):
        lo, hi = ranges.get(domain, (1, max((s.since_version for s in schemas.get((domain, op_type), [])),
                                            default=1)))
        operators.append(_op_entry(domain, op_type, [s for s, _ in impls], schemas.get((domain, op_type), []),
                                   lo, hi))
    refused = [{"domain": DEFAULT, "op_type": name, "reason": why}
               for name, why in sorted(registry.OUT_OF_SCOPE.items())]
    known = set(registry._REGISTRY) | {("", name) for name in registry.OUT_OF_SCOPE}
    missing = []
    for (domain, op_type), ss in sorted(schemas.items(), key=lambda kv: (kv[0][0] != "", kv[0])):
        if (domain, op_type) in known:
            continue
        lo, hi = ranges.get(domain, (1, 10 ** 9))
        if any(s.since_version <= hi for s in ss) and not all(s.deprecated for s in ss):
            missing.append({"domain": _domain_name(domain), "op_type": op_type})
    return {"jacaudit": __version__, "onnx": onnx.__version__,
            "opsets": {_domain_name(d): list(r) for d, r in sorted(ranges.items())},
            "derivatives": "differentiable_inputs: the inputs the ONNX schema tags Differentiable (null: not "
                           "tagged); the interpreter differentiates its float inputs through torch",
            "operators": operators, "refused": refused, "not_implemented": missing}


def _range(r: list[int]) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def _opsets(runs: list[list[int]]) -> str:
    return ", ".join(_range(r) for r in runs) or "-"


def _print_table(data: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    from .common import out

    ops = data["operators"]
    domains = sorted({o["domain"] for o in ops}, key=lambda d: (d != DEFAULT, d))
    out.print(f"{len(ops)} operator(s) in {len(domains)} domain(s); loadable opsets: "
              + ", ".join(f"{d} {_range(data['opsets'][d])}" for d in domains if d in data["opsets"])
              + f" (onnx {data['onnx']})", markup=False)
    t = Table("domain", "op", "opsets", "ONNX versions", "impl. since", "differentiable inputs (ONNX)", "notes",
              box=None)
    for o in ops:
        diff = o["differentiable_inputs"]
        t.add_row(*map(Text, (o["domain"], o["op_type"], _opsets(o["opsets"]),
                              ", ".join(map(str, o["onnx_versions"])), ", ".join(map(str, o["since"])),
                              "?" if diff is None else (", ".join(diff) or "none"), "; ".join(o["notes"]))))
    out.print(t)
    out.print("refused (out of scope, reported as unsupported): "
              + ", ".join(f"{r['op_type']} ({r['reason']})" for r in data["refused"]), markup=False)
    by: dict[str, list[str]] = {}
    for m in data["not_implemented"]:
        by.setdefault(m["domain"], []).append(m["op_type"])
    parts = [f"{d}: " + (", ".join(names) if d in domains or len(names) <= 5 else f"all {len(names)} ops")
             for d, names in sorted(by.items(), key=lambda kv: (kv[0] != DEFAULT, kv[0]))]
    out.print("not implemented: " + ("; ".join(parts) or "none"), markup=False)


def register(app: typer.Typer) -> None:
    @app.command("ops")
    def ops_cmd(
        json_out: Annotated[bool, typer.Option("--json", help="Print the list as JSON (machine-readable).")] = False,
    ) -> None:
        """List the ONNX operators the interpreter implements (from its registry): per domain and op the
        opsets, the ONNX versions and the implementations, the differentiable inputs; then the refused and the
        missing ones. Needs no model."""
        import json
        import sys

        with handle_errors():
            data = collect()
            if json_out:
                sys.stdout.write(json.dumps(data, indent=2) + "\n")
                return
            _print_table(data)
