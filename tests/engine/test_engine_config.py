"""EngineConfig: one declaration of every engine setting, checked where it enters (API and CLI)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from speedx.engine.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]
NON_DEFAULT = dict(model="/m", tokenizer="/t", lora="/a", dtype="float16", quantization="none", kv_cache_dtype="fp8",
                   kv_cache_memory="3GiB", gpu_memory_utilization=0.5, block_size=32, max_model_len=512,
                   max_num_seqs=7, max_num_batched_tokens=100, enable_prefix_caching=False, enforce_eager=True,
                   async_scheduling=False, kernel_backend="torch", device="cuda:1", seed=5)


def parse(argv: list[str], **kwargs) -> argparse.Namespace:
    return EngineConfig.add_cli_args(argparse.ArgumentParser(), **kwargs).parse_args(argv)


def test_every_setting_round_trips_through_the_command_line():
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(EngineConfig)}
    config = EngineConfig(**NON_DEFAULT)
    assert EngineConfig.from_cli_args(parse(config.cli_args())) == config
    assert EngineConfig.from_cli_args(parse([])) == EngineConfig() and EngineConfig().cli_args() == []


@pytest.mark.parametrize("setting, value, allowed", [
    ("max_num_seqs", 0, "an integer >= 1"), ("max_num_seqs", 2.0, "an integer >= 1"),
    ("block_size", True, "an integer >= 1"), ("seed", -1, "an integer >= 0"),
    ("gpu_memory_utilization", 0, "a finite number > 0 and <= 1"),
    ("gpu_memory_utilization", float("nan"), "a finite number"), ("dtype", "float8", "one of auto, bfloat16"),
    ("kv_cache_dtype", "int8", "one of auto, fp8"), ("quantization", "awq", "one of auto, gguf, none"),
    ("kv_cache_memory", "lots", "a size such as '4GiB'"), ("kv_cache_memory", 0, "a size such as '4GiB'"),
    ("device", "tpu", "cpu, cuda or cuda:N"), ("enforce_eager", "yes", "True or False"),
    ("model", " ", "a non-empty string"), ("lora", 3, "a non-empty string"),
])
def test_a_bad_value_names_the_setting_and_what_is_allowed(setting, value, allowed):
    with pytest.raises(ValueError, match=re.escape(f"{setting}={value!r}: expected {allowed}")):
        EngineConfig(**{setting: value})
    with pytest.raises(ValueError, match=re.escape(f"{setting}={value!r}")):
        EngineConfig().replace(**{setting: value})


def test_an_unknown_setting_lists_the_settings_there_are():
    with pytest.raises(TypeError, match="unknown engine setting.s. max_batch; the settings are: model, tokenizer"):
        EngineConfig.from_kwargs(max_batch=3)
    with pytest.raises(TypeError, match="unknown engine setting"):
        EngineConfig.add_cli_args(argparse.ArgumentParser(), only=["max_batch"])


@pytest.mark.parametrize("argv, message", [
    (["--max-num-seqs", "0"], "argument --max-num-seqs: got '0'; give an integer >= 1"),
    (["--dtype", "bf16"], "argument --dtype: got 'bf16'; give one of auto, bfloat16, float16, float32"),
    (["--kv-cache-memory", "4 gigs"], "argument --kv-cache-memory: got '4 gigs'; give a size such as '4GiB'"),
    (["--device", "gpu"], "argument --device: got 'gpu'; give cpu, cuda or cuda:N"),
])
def test_a_bad_flag_stops_the_parser_with_the_allowed_values(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_command_may_take_some_settings_and_change_defaults():
    args = parse(["--max-num-seqs", "4"], only=["model", "max_num_seqs"], defaults={"model": "x"})
    assert not hasattr(args, "dtype")
    assert EngineConfig.from_cli_args(args, seed=3) == EngineConfig(model="x", max_num_seqs=4, seed=3)


def test_each_engine_flag_is_declared_once():
    """Commands and benches that build an engine take its flags from EngineConfig.add_cli_args, never
    their own (kernel benches and the embedding commands have flags of the same names for other things)."""
    flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(EngineConfig)}
    declared = re.compile(r"add_argument\(\s*[\"'](--[a-z-]+)[\"']")
    builders = [path for folder in ("speedx", "bench") for path in (ROOT / folder).rglob("*.py")
                if re.search(r"\bLLM(\(|\.from_config)", path.read_text()) and path.name != "llm.py"]
    assert {"serve.py", "demo.py", "cli_run.py", "throughput.py", "synthesis.py", "step_profile.py"} <= {
        p.name for p in builders}
    parsers = builders + [ROOT / "speedx" / "generate.py"]  # its engine is built in speedx/synth/cli_run.py
    own = [(path.relative_to(ROOT), flag) for path in parsers for flag in declared.findall(path.read_text())
           if flag in flags]
    assert own == []


def test_llm_takes_its_settings_as_keywords_or_a_config(tiny_llama):
    from speedx import LLM

    path, _, _ = tiny_llama
    llm = LLM(str(path), dtype="float32", max_num_seqs=3, kv_cache_memory="64MiB")
    assert llm.config == EngineConfig(model=str(path), dtype="float32", max_num_seqs=3, kv_cache_memory="64MiB")
    assert llm.engine.stats().max_num_seqs == 3
    assert LLM.from_config(llm.config.replace(max_num_seqs=5)).engine.stats().max_num_seqs == 5
    with pytest.raises(TypeError, match="unknown engine setting.s. max_batch"):
        LLM(str(path), max_batch=3)
