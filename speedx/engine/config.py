"""`EngineConfig`: every engine setting, declared once for `LLM`, the CLIs and the benches.

Each field carries its help text and its allowed values; `EngineConfig(...)` checks them (ValueError
naming the setting), and `add_cli_args` turns the same fields into `--flag`s that refuse a bad value
where it enters, in the style of vLLM's EngineArgs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

DTYPES = ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32", "half")
CLI_DTYPES = ("auto", "bfloat16", "float16", "float32")


def _setting(default, help: str, kind: type = str, *, choices: tuple | None = None, at_least=None, at_most=None,
             above=None, cli_choices: tuple | None = None, pattern: tuple[str, str] | None = None):
    """pattern: (regular expression the whole value matches, what to say it allows)."""
    spec = {"help": help, "kind": kind, "choices": choices, "cli_choices": cli_choices or choices,
            "at_least": at_least, "at_most": at_most, "above": above, "pattern": pattern}
    return field(default=default, metadata=spec)


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings. `LLM(model, **settings)` builds one; so does every command's parser."""

    model: str = _setting("default", "'default' (the embedded SmolLM2-135M-Instruct), a Hugging Face directory "
                          "or a .gguf file")
    tokenizer: str | None = _setting(None, "take the tokenizer from this path (default: the model's)")
    lora: str | None = _setting(None, "PEFT LoRA adapter directory trained on the model, merged into the weights "
                                "at load")
    dtype: Any = _setting("auto", "weights and activations: auto (the checkpoint's; bfloat16 for GGUF), "
                          "bfloat16, float16 or float32", choices=DTYPES, cli_choices=CLI_DTYPES)
    quantization: str = _setting("auto", "auto: a GGUF model's Q4_0/Q4_1/Q8_0 weights stay quantized on CPU, as "
                                 "llama.cpp does; gguf: ask for that (an error where it cannot be); none: widen "
                                 "every weight to dtype at load (exact parity with transformers)",
                                 choices=("auto", "gguf", "none"))
    kv_cache_dtype: str = _setting("auto", "auto: the model's dtype; fp8: float8 e4m3 as vLLM's 'fp8', half the "
                                   "KV memory and traffic (meant for GPUs with fp8: compute capability 8.9+)",
                                   choices=("auto", "fp8", "fp8_e4m3"), cli_choices=("auto", "fp8"))
    kv_cache_memory: str | int | None = _setting(None, "KV cache size such as 4GiB (default: 2GiB on CPU, on a GPU "
                                                 "the share gpu_memory_utilization leaves)", kind=bytes)
    gpu_memory_utilization: float = _setting(0.9, "share of GPU memory the engine may use (weights, activations "
                                             "and the KV cache) when kv_cache_memory is not given",
                                             kind=float, above=0, at_most=1)
    block_size: int = _setting(16, "tokens per KV cache block", kind=int, at_least=1)
    max_model_len: int | None = _setting(None, "context length, prompt plus output (default: the model's)",
                                         kind=int, at_least=2)
    max_num_seqs: int = _setting(256, "sequences the engine runs at once", kind=int, at_least=1)
    max_num_batched_tokens: int = _setting(2048, "tokens one engine step may compute (prefill chunks and "
                                           "decodes together)", kind=int, at_least=1)
    enable_prefix_caching: bool = _setting(True, "reuse the KV cache of prompt prefixes already computed",
                                           kind=bool)
    enforce_eager: bool = _setting(False, "on CUDA, do not capture CUDA graphs for decode steps (capture takes "
                                   "a few seconds and some GPU memory)", kind=bool)
    async_scheduling: bool | None = _setting(None, "launch each decode step before the previous step's tokens "
                                             "reach the host (default: on for a GPU, off on CPU)", kind=bool)
    kernel_backend: str | None = _setting(None, "kernels: auto (Triton on CUDA, speedx's C++ kernels on a CPU), "
                                          "triton (also on CPU under TRITON_INTERPRET=1) or torch (the PyTorch "
                                          "twins); default: $SPEEDX_KERNELS, else auto",
                                          choices=("auto", "triton", "torch"))
    device: str | None = _setting(None, "where the model runs: cpu, cuda or cuda:N (default: cuda when available, else cpu)",
                                  pattern=(r"cpu|cuda(:\d+)?", "cpu, cuda or cuda:N"))
    seed: int = _setting(0, "seed of requests without their own seed", kind=int, at_least=0)

    def __post_init__(self):
        for spec in dataclasses.fields(self):
            _check(spec, getattr(self, spec.name))

    def replace(self, **changes) -> "EngineConfig":
        """A copy with some settings changed (checked like the constructor's)."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_kwargs(cls, **settings) -> "EngineConfig":
        """Like the constructor, with a message listing the settings there are for a name that is not one."""
        _check_names(settings)
        return cls(**settings)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, *, only: Iterable[str] | None = None,
                     defaults: dict | None = None, helps: dict | None = None) -> argparse.ArgumentParser:
        """Adds `--flag`s for the settings (all, or those named in `only`) to parser, in an "engine"
        group. defaults and helps replace a field's default or help text for this command."""
        names = list(only) if only is not None else [f.name for f in dataclasses.fields(cls)]
        _check_names(dict.fromkeys(names))
        _check_names(defaults or {})
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        group = parser.add_argument_group("engine")
        for name in names:
            spec, meta = by_name[name], by_name[name].metadata
            default = (defaults or {}).get(name, spec.default)
            help_text = (helps or {}).get(name, meta["help"])
            if default is not None and meta["kind"] is not bool:
                help_text += f" (default: {default})"
            flag = "--" + name.replace("_", "-")
            if meta["kind"] is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            else:
                metavar = ("{" + ",".join(meta["cli_choices"]) + "}" if meta["cli_choices"]
                           else {int: "N", float: "X", bytes: "SIZE"}.get(meta["kind"], "PATH"))
                group.add_argument(flag, type=_cli_parser(spec), default=default, help=help_text, metavar=metavar)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides) -> "EngineConfig":
        """The settings parsed by add_cli_args (fields the parser lacks keep their defaults)."""
        settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls.from_kwargs(**(settings | overrides))

    def cli_args(self) -> list[str]:
        """The flags that give this config to a command (settings left at their defaults are left out)."""
        flags = []
        for spec in dataclasses.fields(self):
            value, flag = getattr(self, spec.name), "--" + spec.name.replace("_", "-")
            if value == spec.default:
                continue
            if spec.metadata["kind"] is bool:
                flags.append(flag if value else "--no-" + flag[2:])
            else:
                flags += [flag, str(value).removeprefix("torch.")]
        return flags

    def as_dict(self) -> dict:
        """The settings as JSON-friendly values (a torch dtype by name)."""
        return {k: str(v).removeprefix("torch.") if k == "dtype" else v for k, v in dataclasses.asdict(self).items()}


def _check_names(settings: dict) -> None:
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(EngineConfig)})
    if unknown:
        known = ", ".join(f.name for f in dataclasses.fields(EngineConfig))
        raise TypeError(f"unknown engine setting(s) {', '.join(unknown)}; the settings are: {known}")


def _allowed(meta) -> str:
    if meta["choices"]:
        return "one of " + ", ".join(map(str, meta["choices"]))
    if meta["pattern"]:
        return meta["pattern"][1]
    bounds = [f">= {meta['at_least']}" if meta["at_least"] is not None else None,
              f"> {meta['above']}" if meta["above"] is not None else None,
              f"<= {meta['at_most']}" if meta["at_most"] is not None else None]
    what = {int: "an integer", float: "a finite number", bool: "True or False", bytes: "a size such as '4GiB' "
            "or a positive number of bytes", str: "a non-empty string"}[meta["kind"]]
    return " ".join([what, " and ".join(b for b in bounds if b)]).strip()


def _check(spec: dataclasses.Field, value) -> None:
    meta = spec.metadata
    if value is None and spec.default is None:
        return
    kind, ok = meta["kind"], True
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is bytes:
        ok = _is_size(value)
    elif spec.name == "dtype" and type(value).__name__ == "dtype":  # a torch.dtype is taken as is
        return
    else:
        ok = isinstance(value, str) and bool(value.strip())
    if ok and meta["choices"]:
        ok = value in meta["choices"]
    if ok and meta["pattern"]:
        ok = re.fullmatch(meta["pattern"][0], value) is not None
    if ok and kind in (int, float):
        ok = ((meta["at_least"] is None or value >= meta["at_least"]) and (meta["above"] is None or value > meta["above"])
              and (meta["at_most"] is None or value <= meta["at_most"]))
    if not ok:
        raise ValueError(f"{spec.name}={value!r}: expected {_allowed(meta)}")


def _is_size(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return value > 0
    try:
        return isinstance(value, str) and parse_bytes(value) > 0
    except ValueError:
        return False


def parse_bytes(size: str | int) -> int:
    """'512MiB', '4GiB', '1.5G' or a number of bytes, as an int."""
    if isinstance(size, numbers.Integral):
        return int(size)
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read memory size {size!r}; write it like '512MiB' or '4GiB'")
    units = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    try:
        number = float(match.group(1))
    except ValueError:
        raise ValueError(f"cannot read memory size {size!r}; write it like '512MiB' or '4GiB'") from None
    return int(number * units[match.group(2).lower().rstrip("b").rstrip("i")])


def _cli_parser(spec: dataclasses.Field):
    """argparse type: text -> the field's value, refused with the allowed values if it does not check."""
    kind = spec.metadata["kind"]

    meta = spec.metadata
    allowed = "one of " + ", ".join(meta["cli_choices"]) if meta["cli_choices"] else _allowed(meta)

    def parse(text: str):
        try:
            value = {int: int, float: float}.get(kind, str)(text)
            _check(spec, value)
            if meta["cli_choices"] and value not in meta["cli_choices"]:
                raise ValueError(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}; give {allowed}") from None
        return value

    return parse
