"""The backend table is the one place that knows backends: no other module tests a backend's name, and
`auto`, doctor and precision="auto" follow the table's rows."""

import ast
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import edgegen.runtime
import pytest
from edgegen.runtime import Pipeline, backends
from edgegen.runtime.backends import BACKEND_SPECS, backend_spec, candidates
from edgegen.runtime.errors import BadInputError
from edgegen.runtime.precision import choose_precision, form_for

TABLE = Path(backends.__file__)
ROOT = Path(edgegen.runtime.__file__).parent.parent  # runtime/, export/ and serve/ sit at the top level
SOURCES = sorted(
    path for part in ("runtime", "export", "serve") for path in (ROOT / part).rglob("*.py") if path != TABLE
)
NAMES = set(BACKEND_SPECS)
OLD_NAME_LISTS = {"TRT_BACKENDS", "GPU_BACKENDS", "ORT_PROVIDERS", "SPEED_ORDER", "FLAVOURS", "FLAVOUR_NAMES"}


def _is_name(node) -> bool:
    return isinstance(node, ast.Constant) and node.value in NAMES


def _names_in(node) -> bool:
    """A backend name, or a tuple / list / set literal holding one."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_name(e) for e in node.elts)
    return _is_name(node)


def name_tests(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every place that decides something on a backend's name written as a string: a
    comparison or membership test with it, a dict keyed by it, a match case on it, or startswith/endswith
    with a prefix of one; and any use of the name lists that the table replaced."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(_names_in(n) for n in (node.left, *node.comparators)):
            found.append((node.lineno, "compares with a backend name"))
        elif isinstance(node, ast.Dict) and any(k is not None and _is_name(k) for k in node.keys):
            found.append((node.lineno, "a dict keyed by backend names"))
        elif isinstance(node, ast.MatchValue) and _is_name(node.value):
            found.append((node.lineno, "matches a backend name"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("startswith", "endswith")
        ):
            for arg in node.args:
                prefixes = arg.elts if isinstance(arg, ast.Tuple) else [arg]
                if any(
                    isinstance(p, ast.Constant)
                    and isinstance(p.value, str)
                    and p.value
                    and any(n.startswith(p.value) or n.endswith(p.value) for n in NAMES)
                    for p in prefixes
                ):
                    found.append((node.lineno, f"{node.func.attr} on part of a backend name"))
        elif (
            isinstance(node, (ast.Name, ast.alias))
            and (getattr(node, "id", None) or node.name) in OLD_NAME_LISTS
        ):
            found.append((node.lineno, f"uses {getattr(node, 'id', None) or node.name}"))
    return found


def test_the_scan_finds_what_it_looks_for():
    code = (
        'if backend == "trt": pass\nif b not in ("x", "ort-cuda"): pass\nT = {"trt-rtx": 2}\n'
        'ok = name.startswith("ort-")\nfrom .backends import TRT_BACKENDS\n'
        'check(bundle, "ort-cpu")\nif backend_spec(backend).gpu: pass\n'
    )
    assert [line for line, _ in name_tests(ast.parse(code))] == [1, 2, 3, 4, 5]


def test_no_module_outside_the_table_tests_a_backend_name():
    assert {p.relative_to(ROOT).parts[0] for p in SOURCES} == {"runtime", "export", "serve"} and len(
        SOURCES
    ) > 30
    offences = [
        f"{path.relative_to(TABLE.parent.parent)}:{line}: {what}"
        for path in SOURCES
        for line, what in name_tests(ast.parse(path.read_text(), str(path)))
    ]
    assert not offences, "read the backend table (runtime/backends.py) instead:\n" + "\n".join(offences)


def test_every_row_is_consistent():
    for name, spec in BACKEND_SPECS.items():
        assert spec.name == name
        assert (spec.provider is None) == (spec.engines is not None), f"{name}: ONNX Runtime xor engines"
        assert spec.int8_form in ("int8", "int8-qdq") and sorted(spec.speed_order) == ["fp16", "fp32", "int8"]
        if spec.engines:  # the judge is an ONNX file: a backend without a provider names where it runs
            assert spec.judge_on and all(BACKEND_SPECS[b].provider for b in spec.judge_on)
    assert len({s.auto_rank for s in BACKEND_SPECS.values()}) == len(BACKEND_SPECS)
    with pytest.raises(BadInputError, match="unknown backend: 'warp'"):
        backend_spec("warp")


@pytest.fixture
def cpu_row_ranked_first(monkeypatch):
    """A new row: ONNX Runtime's CPU provider under another name, ranked before every other backend."""
    row = replace(BACKEND_SPECS["ort-cpu"], name="ort-cpu-first", auto_rank=0)
    monkeypatch.setitem(BACKEND_SPECS, row.name, row)
    yield row
    backends.backend_loads.cache_clear()


def test_the_table_drives_auto(monkeypatch, bert_bundle, cpu_row_ranked_first):
    order = candidates("auto", bundle=bert_bundle)
    assert order == ["ort-cpu-first", "trt", "trt-rtx", "ort-trt", "ort-cuda", "ort-cpu"]
    assert candidates("auto") == [n for n in order if not BACKEND_SPECS[n].engines]  # engines need a bundle
    pipe = Pipeline.from_bundle(bert_bundle)
    assert pipe.backend == "ort-cpu-first" and pipe.notes == []  # nothing ranked before it was tried
    # reversed ranks: `auto` tries the backends in the reverse order, and ort-cpu now wins
    for rank, name in enumerate(reversed(order)):
        monkeypatch.setitem(BACKEND_SPECS, name, replace(BACKEND_SPECS[name], auto_rank=rank))
    assert candidates("auto", bundle=bert_bundle) == order[::-1]
    pipe = Pipeline.from_bundle(bert_bundle)
    assert pipe.backend == "ort-cpu" and pipe.notes == []


def test_a_new_row_is_checked_by_doctor_like_the_others(bert_bundle, cpu_row_ranked_first):
    from edgegen.runtime.doctor import run_doctor

    report = run_doctor(bert_bundle)
    entry = report["backends"]["ort-cpu-first"]
    assert entry["loads"] and entry["checked"] and entry["ok"]
    assert entry["max_abs_pixel_diff"] == report["backends"]["ort-cpu"]["max_abs_pixel_diff"]


def fake_bundle(passed: tuple[str, ...]):
    report = {"precisions": {form: {"ok": form in passed} for form in ("fp16", "int8", "int8-qdq")}}
    return SimpleNamespace(precisions=["fp32", "fp16", "int8"], root="B", report=lambda: report)


def test_precision_auto_follows_each_rows_speed_order_and_int8_form(monkeypatch):
    every = fake_bundle(("fp16", "int8", "int8-qdq"))
    assert choose_precision(every, "auto", "ort-cpu") == "int8"
    assert choose_precision(every, "auto", "ort-cuda") == "int8"
    # int8 failed its gate: the next fastest, which differs between CPUs and GPUs
    no_int8 = fake_bundle(("fp16",))
    assert choose_precision(no_int8, "auto", "ort-cpu") == "fp32"
    assert choose_precision(no_int8, "auto", "ort-cuda") == "fp16"
    # only the form a backend runs counts: the CPU's int8 passed, the GPUs' int8-qdq did not
    cpu_int8 = fake_bundle(("int8",))
    assert choose_precision(cpu_int8, "auto", "ort-cpu") == "int8"
    assert choose_precision(cpu_int8, "auto", "ort-trt") == "fp32"
    assert [form_for("int8", b) for b in ("ort-cpu", "ort-cuda", "trt")] == ["int8", "int8-qdq", "int8-qdq"]
    assert form_for("fp16", "ort-cpu") == "fp16"
    monkeypatch.setitem(
        BACKEND_SPECS,
        "ort-cpu",
        replace(BACKEND_SPECS["ort-cpu"], speed_order=("fp16", "int8", "fp32"), int8_form="int8-qdq"),
    )
    assert choose_precision(every, "auto", "ort-cpu") == "fp16"
    assert form_for("int8", "ort-cpu") == "int8-qdq"
