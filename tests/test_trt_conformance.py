"""ci/trt_conformance.py against the real TensorRT 10 and 11 bindings and torch-tensorrt's keywords.

The bindings wheels are downloaded (and their API index cached) by the checker's own code; the tests
skip only when the package index cannot be reached.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("trt_conformance", REPO / "ci" / "trt_conformance.py")
assert _spec is not None and _spec.loader is not None
tc = importlib.util.module_from_spec(_spec)
sys.modules["trt_conformance"] = tc  # dataclasses look their module up while the class is built
_spec.loader.exec_module(tc)

TRT10, TRT11 = (b.split("==")[1] for b in tc.BINDINGS)


@pytest.fixture(scope="session")
def indexes():
    try:
        return [tc.bindings_index(b) for b in tc.BINDINGS]
    except tc.IndexUnreachable as e:
        pytest.skip(str(e))


def planted(tmp_path, indexes, body):
    """The failures of `body` (a module using TensorRT) as {(name, problem-start): set of versions}."""
    path = tmp_path / "planted.py"
    path.write_text(textwrap.dedent(body))
    found = {}
    for f in tc.check_trt([path], tmp_path, indexes).failures:
        problem, _, version = f.problem.rpartition(" [")
        found.setdefault((f.name, problem), set()).add(version.rstrip("]"))
    return found


BUILD = """
import tensorrt as trt

def trt_major(version):
    return int(version.split(".")[0])

def build(onnx):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    config = builder.create_builder_config()
    config.builder_optimization_level = 3
    {line}
"""


def test_index_is_read_from_the_real_modules(indexes):
    """The two releases differ where NVIDIA's release notes say they do: 11 dropped the weak-typing flags."""
    v10, v11 = indexes
    assert (v10["version"], v11["version"]) == (TRT10, TRT11)
    assert "FP16" in v10["classes"]["BuilderFlag"]["members"]
    assert "FP16" not in v11["classes"]["BuilderFlag"]["members"]
    deserialize = v11["classes"]["Runtime"]["members"]["deserialize_cuda_engine"]["sigs"][0]
    assert deserialize["params"][1][0] == "serialized_engine" and deserialize["returns"] == "ICudaEngine"
    assert v10["classes"]["Runtime"]["members"]["engine_host_code_allowed"]["writable"]


def test_project_tensorrt_code_conforms_to_10_and_11(indexes):
    result = tc.check_trt(tc.discover(REPO, "tensorrt"), REPO, indexes)
    assert result.failures == []
    checked = {name for _, _, name in result.checked}
    # the walk followed types through constructors, return types and annotations, not just `trt.X`
    for name in (
        "IBuilderConfig.set_timing_cache(_, ignore_mismatch)",
        "IExecutionContext.execute_async_v3(_)",
    ):
        assert name in checked
    assert "Runtime.engine_host_code_allowed =" in checked


def test_clean_planted_code_passes(tmp_path, indexes):
    assert (
        planted(tmp_path, indexes, BUILD.format(line="config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)"))
        == {}
    )


def test_misspelt_attribute_fails_in_both_versions(tmp_path, indexes):
    found = planted(
        tmp_path, indexes, BUILD.format(line="config.set_flags(trt.BuilderFlag.VERSION_COMPATIBLE)")
    )
    assert found == {("IBuilderConfig.set_flags", "is not an attribute of IBuilderConfig"): {TRT10, TRT11}}


def test_api_removed_in_11_fails_only_in_11_without_a_version_branch(tmp_path, indexes):
    found = planted(tmp_path, indexes, BUILD.format(line="config.set_flag(trt.BuilderFlag.FP16)"))
    assert found == {("trt.BuilderFlag.FP16", "is not a member of the enum BuilderFlag"): {TRT11}}


@pytest.mark.parametrize(
    "guarded",
    [
        "if trt_major(trt.__version__) < 11:\n        config.set_flag(trt.BuilderFlag.FP16)",
        "if trt_major(trt.__version__) >= 11:\n        return\n    config.set_flag(trt.BuilderFlag.FP16)",
        "config.set_flag(trt.BuilderFlag.FP16) if 11 > trt_major(trt.__version__) else None",
    ],
)
def test_api_removed_in_11_passes_behind_a_version_branch(tmp_path, indexes, guarded):
    assert planted(tmp_path, indexes, BUILD.format(line=guarded)) == {}


def test_keyword_that_does_not_exist_fails(tmp_path, indexes):
    line = "config.set_timing_cache(config.create_timing_cache(b''), ignore_missmatch=False)"
    found = planted(tmp_path, indexes, BUILD.format(line=line))
    assert list(found) == [
        (
            "IBuilderConfig.set_timing_cache",
            "has no keyword argument 'ignore_missmatch' (keywords: cache, ignore_mismatch)",
        )
    ]
    assert found[next(iter(found))] == {TRT10, TRT11}


def test_arity_read_only_constructor_and_override_errors(tmp_path, indexes):
    found = planted(
        tmp_path,
        indexes,
        """
        import tensorrt as trt

        def run(engine: trt.ICudaEngine, stream: int) -> None:
            engine.num_io_tensors = 3
            context = engine.create_execution_context()
            context.execute_async_v3(stream, 0)
            trt.ICudaEngine()

        class Progress(trt.IProgressMonitor):
            def phase_strat(self, phase_name, parent_phase, num_steps):
                pass
        """,
    )
    assert {name: problem for name, problem in found} == {
        "ICudaEngine.num_io_tensors": "is read-only on ICudaEngine",
        "IExecutionContext.execute_async_v3": "takes at most 1 positional arguments, 2 given",
        "trt.ICudaEngine": "ICudaEngine has no constructor",
        "trt.IProgressMonitor.phase_strat": "overrides nothing: IProgressMonitor has no method phase_strat",
    }


def test_types_follow_self_attributes_containers_and_getattr(tmp_path, indexes):
    found = planted(
        tmp_path,
        indexes,
        """
        import tensorrt as trt

        class Runner:
            def __init__(self, engine: trt.ICudaEngine) -> None:
                self._contexts: dict[int, trt.IExecutionContext] = {}
                self._engine = engine

            def run(self, n: int, stream: int) -> None:
                self._contexts[n].execute_async_v4(stream)
                self._engine.get_tensor_shap("ct")
                getattr(trt.BuilderFlag, "FP16")
        """,
    )
    assert found == {
        ("IExecutionContext.execute_async_v4", "is not an attribute of IExecutionContext"): {TRT10, TRT11},
        ("ICudaEngine.get_tensor_shap", "is not an attribute of ICudaEngine"): {TRT10, TRT11},
        ("trt.BuilderFlag.FP16", "is not a member of the enum BuilderFlag"): {TRT11},
    }


def test_untyped_tensorrt_use_needs_an_allow_list_entry(tmp_path, indexes, monkeypatch):
    body = """
    import tensorrt as trt

    def run(contexts, stream):
        contexts[0].execute_async_v3(stream)
    """
    name = "contexts[0].execute_async_v3"
    found = planted(tmp_path, indexes, body)
    assert [n for n, _ in found] == [name]
    assert "cannot type its receiver" in next(iter(found))[1]
    monkeypatch.setitem(tc.UNTYPED_ALLOWED, ("planted.py", name), "a list of IExecutionContext")
    assert planted(tmp_path, indexes, body) == {}


def test_cli_prints_file_line_name_and_version_and_exits_nonzero(tmp_path, indexes, capsys):
    path = tmp_path / "planted.py"
    path.write_text(textwrap.dedent(BUILD.format(line="config.set_flag(trt.BuilderFlag.FP16)")))
    assert tc.main(["--root", str(REPO), str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"{path}:13: trt.BuilderFlag.FP16: is not a member of the enum BuilderFlag (in {TRT11})" in out


def test_signature_parser_handles_pybind11_defaults():
    sig = tc.parse_signature(
        "__init__(self: tensorrt_bindings.tensorrt.Logger, "
        "min_severity: tensorrt_bindings.tensorrt.ILogger.Severity = <Severity.WARNING: 2>) -> None",
        "__init__",
    )
    assert sig == {"params": [["self", "pos", False], ["min_severity", "pos", True]], "returns": "None"}
    assert (
        tc.parse_signature("    get_tensor_shape(name) -> Dims  (prose, not a signature)", "get_tensor_shape")
        is None
    )


# ----------------------------------------------------------------------------------------------
# torch-tensorrt

KEYWORDS = json.loads(tc.TORCH_TRT_KEYWORDS.read_text(encoding="utf-8"))


def torch_trt_failures(tmp_path, call, versions):
    path = tmp_path / "planted.py"
    path.write_text(f"import torch_tensorrt\n\ndef f(model, inputs):\n    return {call}\n")
    return [(f.name, f.problem) for f in tc.check_torch_trt([path], tmp_path, KEYWORDS, versions)]


def test_keyword_lists_match_the_releases_notes():
    """As the issue says, checked against the sources: enable_autocast from 2.10, use_explicit_typing
    gone in 2.13."""

    def accepts(version, keyword):
        entry = KEYWORDS["versions"][version]["torch_tensorrt.dynamo.compile"]
        return keyword in entry["positional"] + entry["keyword_only"] + entry["kwargs_read"]

    assert all(accepts(v, "enable_autocast") for v in KEYWORDS["versions"])
    assert [v for v in KEYWORDS["versions"] if accepts(v, "use_explicit_typing")] == [
        "2.10.0",
        "2.11.0",
        "2.12.0",
        "2.12.1",
    ]


def test_torch_trt_keyword_removed_in_2_13_fails_there_only(tmp_path):
    call = "torch_tensorrt.compile(model, ir='dynamo', inputs=inputs, use_explicit_typing=True)"
    assert torch_trt_failures(tmp_path, call, ["2.12.1", "2.13.0"]) == [
        ("torch_tensorrt.compile", "has no keyword argument 'use_explicit_typing' [torch-tensorrt 2.13.0]")
    ]


def test_torch_trt_valid_and_misspelt_keywords(tmp_path):
    good = "torch_tensorrt.dynamo.compile(model, arg_inputs=inputs, enable_autocast=True, min_block_size=1)"
    assert torch_trt_failures(tmp_path, good, list(KEYWORDS["versions"])) == []
    bad = "torch_tensorrt.compile(model, ir='dynamo', inputs=inputs, enable_autocats=True)"
    assert torch_trt_failures(tmp_path, bad, ["2.13.0"]) == [
        ("torch_tensorrt.compile", "has no keyword argument 'enable_autocats' [torch-tensorrt 2.13.0]")
    ]


@pytest.mark.parametrize(
    ("pin", "versions", "problems"),
    [
        ("torch-tensorrt>=2.10,<2.15", ["2.10.0", "2.11.0", "2.12.0", "2.12.1", "2.13.0", "2.14.0"], 0),
        ("torch-tensorrt>=2.12,<2.13", ["2.12.0", "2.12.1"], 0),
        ("torch-tensorrt>=2.4,<2.15", ["2.10.0", "2.11.0", "2.12.0", "2.12.1", "2.13.0", "2.14.0"], 1),
        ("torch-tensorrt>=2.10", ["2.10.0", "2.11.0", "2.12.0", "2.12.1", "2.13.0", "2.14.0"], 1),
    ],
)
def test_pin_must_stay_inside_the_releases_with_keyword_lists(tmp_path, pin, versions, problems):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\nname = "x"\noptional-dependencies = {{ gpu = ["{pin}"] }}\n')
    got_versions, got_problems = tc.torch_trt_range(pyproject, KEYWORDS)
    assert got_versions == versions
    assert len(got_problems) == problems


def test_project_torch_tensorrt_calls_conform():
    data = KEYWORDS
    versions, problems = tc.torch_trt_range(REPO / "pyproject.toml", data)
    assert problems == []
    assert tc.check_torch_trt(tc.discover(REPO, "torch_tensorrt"), REPO, data, versions) == []


def test_torch_trt_keywords_follow_the_installed_release():
    from m2anet.engines.torch_backend import compile_keywords

    wanted = {"use_explicit_typing": True, "enable_autocast": True, "autocast_low_precision_type": "fp16"}
    assert compile_keywords("2.12.1", wanted) == wanted
    assert compile_keywords("2.13.0+cu130", wanted) == {
        "enable_autocast": True,
        "autocast_low_precision_type": "fp16",
    }
    with pytest.raises(RuntimeError, match=r"torch-tensorrt 2\.9\.0 is not a release"):
        compile_keywords("2.9.0", wanted)
    with pytest.raises(RuntimeError, match=r"torch-tensorrt 2\.13\.0 has no compile keyword enable_autocats"):
        compile_keywords("2.13.0", {"enable_autocats": True})
