"""Which precision a pipeline runs, and which file form of it: both read from the backend table."""

from __future__ import annotations

from .backends import backend_spec
from .bundle import PRECISIONS, Bundle
from .errors import BackendUnavailableError, BadInputError


def form_for(precision: str, backend: str) -> str:
    """Which file form of ``precision`` a backend runs (int8 has two: see bundle.FORMS)."""
    return backend_spec(backend).int8_form if precision == "int8" else precision


def choose_precision(bundle: Bundle, requested: str, backend: str, forms: set[str] | None = None) -> str:
    """``auto``: the fastest precision on ``backend`` whose quality gate passed at export. ``forms``: for
    TensorRT backends, the forms that have engines for this machine (a precision without one cannot run)."""
    if requested == "auto":
        return _fastest_passed(bundle, backend, forms)
    if requested not in PRECISIONS:
        raise BadInputError(
            "precision", f"unknown precision {requested!r}", f"choose auto or one of {', '.join(PRECISIONS)}"
        )
    if requested not in bundle.precisions:
        raise BadInputError(
            "precision",
            f"bundle has no {requested} files",
            f"it has {', '.join(bundle.precisions)}; re-export with --precision {requested}",
        )
    if forms is not None and form_for(requested, backend) not in forms:
        have = sorted(p for p in PRECISIONS if form_for(p, backend) in forms)
        raise BackendUnavailableError(
            f"bundle engines ({backend})",
            f"no {requested} engines for this machine",
            f"engines exist for {', '.join(have) or 'no precision'}: pass --precision "
            f"{have[0] if have else 'auto'}, or rebuild: edgegen engines {bundle.root} "
            f"--flavour {backend}",
        )
    return requested


def _fastest_passed(bundle: Bundle, backend: str, forms: set[str] | None) -> str:
    passed = bundle.report().get("precisions", {})
    for precision in backend_spec(backend).speed_order:
        form = form_for(precision, backend)
        entry = passed.get(form)
        if forms is not None and form not in forms:
            continue
        if precision in bundle.precisions and (precision == "fp32" or (entry and entry.get("ok"))):
            return precision
    if forms is None:
        return bundle.precisions[0]
    usable = [p for p in PRECISIONS if p in bundle.precisions and form_for(p, backend) in forms]
    if usable:
        return usable[0]
    raise BackendUnavailableError(
        f"bundle engines ({backend})",
        "no engine set covers every component",
        f"rebuild them: edgegen engines {bundle.root} --flavour {backend}",
    )
