"""What a device app may throw at the runtime: odd text, many threads, several processes, interrupted
exports."""

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from edgegen.runtime import BadBundleError, BadInputError, Bundle, Pipeline, TruncationWarning
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def pipe(bert_bundle):
    return Pipeline.from_bundle(bert_bundle, backend="ort-cpu")


@pytest.mark.parametrize("prompt", ["", "   ", "\t\n", "a\x00b\x07c", "émoji ✨ 火箭", "x" * 100_000])
def test_odd_but_valid_prompts_generate(pipe, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        out = pipe(prompt, seed=1, output_type="uint8")
    assert out.shape == (1, 16, 16, 3)


def test_very_long_prompt_is_truncated_with_a_warning(pipe):
    with pytest.warns(TruncationWarning):
        pipe("a rocket " * 50_000, seed=1)
    assert pipe.last_call.truncated == [True]


def test_lone_surrogate_is_a_clear_error(pipe):
    with pytest.raises(BadInputError, match="not valid Unicode"):
        pipe("abc\ud800", seed=1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompts=st.lists(st.text(max_size=80), min_size=1, max_size=3),
    seed=st.integers(min_value=0, max_value=2**64 - 8),
    k=st.integers(min_value=1, max_value=3),
)
def test_property_any_text_any_seed(pipe, prompts, seed, k):
    """Either images of the right shape, or a BadInputError that explains itself; nothing else."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            out = pipe(prompts, seed=seed, num_images_per_prompt=k, output_type="uint8")
    except BadInputError as e:
        assert "Note:" in str(e)
        return
    assert out.shape == (len(prompts) * k, 16, 16, 3) and out.dtype == np.uint8
    assert pipe.last_call.seeds == [seed + i for i in range(len(prompts) * k)]


def test_eight_threads_match_serial(bert_bundle):
    pipe = Pipeline.from_bundle(bert_bundle, backend="ort-cpu")
    jobs = [(f"prompt {i % 5}", i) for i in range(32)]
    serial = {seed: pipe(p, seed=seed, output_type="uint8") for p, seed in jobs}
    pipe.clear_cache()
    results, errors = {}, []

    def worker(chunk):
        try:
            for p, seed in chunk:
                results[seed] = pipe(p, seed=seed, output_type="uint8")
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(jobs[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    for seed, image in serial.items():
        assert np.abs(image.astype(int) - results[seed].astype(int)).max() <= 1, seed


GENERATE = """
import hashlib, sys
from edgegen.runtime import Pipeline
pipe = Pipeline.from_bundle(sys.argv[1], backend="ort-cpu", precision="fp32")
print(hashlib.sha256(pipe(["a red apple", "cat"], seed=[5, 9], output_type="uint8").tobytes()).hexdigest())
"""


def test_bit_identical_across_processes(bert_bundle):
    digests = {
        subprocess.run(
            [sys.executable, "-c", GENERATE, str(bert_bundle)], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    here = Pipeline.from_bundle(bert_bundle, backend="ort-cpu", precision="fp32")
    digests.add(
        hashlib.sha256(here(["a red apple", "cat"], seed=[5, 9], output_type="uint8").tobytes()).hexdigest()
    )
    assert len(digests) == 1


def test_sigint_during_export_leaves_nothing(tiny_checkpoints, tmp_path):
    out = tmp_path / "bundle"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgegen.runtime.cli",
            "export",
            str(tiny_checkpoints["bert"]),
            "-o",
            str(out),
            "--precision",
            "int8",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        p.name.startswith(".bundle.partial") for p in tmp_path.iterdir()
    ):
        time.sleep(0.05)
    time.sleep(1.5)  # well inside the export (tracing / quantizing)
    assert proc.poll() is None, "export finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, (
        proc.returncode,
        err[-2000:],
    )
    assert list(tmp_path.iterdir()) == []
    # and it succeeds when run again
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgegen.runtime.cli",
            "export",
            str(tiny_checkpoints["bert"]),
            "-o",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    Bundle.open(out)


def test_external_data_leaving_the_bundle_is_refused(bundle_copy):
    """A model whose weights point outside the bundle is refused, hashes notwithstanding."""
    from edgegen.runtime.bundle import file_entry

    rel = "onnx/generator.fp32.onnx"
    data = (bundle_copy / rel).read_bytes()
    evil = data.replace(b"weights.fp32.bin", b"../../etc/passwd")  # same length: the protobuf stays valid
    assert evil != data
    (bundle_copy / rel).write_bytes(evil)
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["files"][rel] = file_entry(bundle_copy, rel)
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BadBundleError, match="leaves the bundle"):
        Bundle.open(bundle_copy)


def _mutations():
    values = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.text(max_size=20),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    )
    return st.lists(
        st.tuples(
            st.lists(
                st.sampled_from(
                    [
                        "schema",
                        "family",
                        "components",
                        "files",
                        "precisions",
                        "tokenizer",
                        "generation",
                        "fused",
                        "generator",
                        "inputs",
                        "files",
                        "fp32",
                        "onnx/fused.fp32.onnx",
                        "sha256",
                        "bytes",
                        "max_length",
                        "shape",
                        "0",
                        "name",
                    ]
                ),
                min_size=1,
                max_size=4,
            ),
            values,
        ),
        min_size=1,
        max_size=3,
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=_mutations())
def test_fuzz_manifest(bert_bundle, tmp_path_factory, mutations):
    """Any mangled manifest is either still valid or refused with BadBundleError: never another exception."""
    import shutil

    root = tmp_path_factory.mktemp("fuzz") / "b"
    shutil.copytree(bert_bundle, root)
    m = json.loads((root / "manifest.json").read_text())
    for path, value in mutations:
        node = m
        for key in path[:-1]:
            node = (
                node.get(key)
                if isinstance(node, dict)
                else (
                    node[int(key)]
                    if isinstance(node, list) and key.isdigit() and int(key) < len(node)
                    else None
                )
            )
            if node is None:
                break
        if isinstance(node, dict):
            node[path[-1]] = value
    (root / "manifest.json").write_text(json.dumps(m))
    try:
        pipe = Pipeline.from_bundle(root, backend="ort-cpu")
    except (BadBundleError, BadInputError):
        return
    pipe("a red apple", seed=1)


def test_a_manifest_without_the_familys_components_is_refused(bundle_copy):
    """Found by test_fuzz_manifest: `components: {}` passed Bundle.open and ended in a KeyError at load."""
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["components"] = {}
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    # refused by Bundle.open (reference_outputs name a component the manifest lacks) or at load
    with pytest.raises(BadBundleError, match="no 'fused' component|names no output of a component"):
        Pipeline.from_bundle(bundle_copy, backend="ort-cpu")
