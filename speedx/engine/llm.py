"""`LLM`: the user-facing facade (vLLM-compatible) over the engine."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import numbers
import sys
import time
from collections import deque
from typing import Callable, Iterator, Sequence as Seq

import torch

from speedx._C import BlockPool
from speedx.engine.config import EngineConfig, parse_bytes
from speedx.engine.llm_engine import LLMEngine
from speedx.engine.model_runner import ModelRunner
from speedx.engine.outputs import RequestOutput
from speedx.engine.sampling_params import SamplingParams
from speedx.kernels.registry import select as select_kernels
from speedx.models.cpu_linear import resolve_quantization, use_fast_cpu_matmuls
from speedx.models.llama import LlamaForCausalLM
from speedx.models.lora import LoRAAdapter
from speedx.models.loader import gguf_quantized_weights, is_gguf, load_config_and_weights, load_tokenizer, resolve_model_path

logger = logging.getLogger("speedx")


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, not at import (pytest and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


if not logger.handlers:  # log to stderr like vLLM unless the application configured logging
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s speedx: %(message)s", "%H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16}
DEFAULT_CPU_KV_CACHE = "2GiB"

Prompt = str | list[int]


class LLM:
    """Offline batched generation with a paged KV cache, continuous batching and prefix caching.

    `LLM(model, **settings)`: the settings are EngineConfig's (speedx/engine/config.py says what each
    does), as vLLM's LLM takes EngineArgs' as keyword arguments; `LLM.from_config(config)` takes a
    whole EngineConfig. The one in use is `llm.config`.
    """

    def __init__(self, model: str = "default", **settings):
        self.config = config = EngineConfig.from_kwargs(model=model, **settings)
        model, lora, block_size, max_num_seqs = config.model, config.lora, config.block_size, config.max_num_seqs
        path = resolve_model_path(model)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        keep_quantized = resolve_quantization(config.quantization, path, self.device, lora is not None)
        model_config, weights = load_config_and_weights(path)  # weights: lazy, read by load_weights below
        self._sampling_defaults = _checked_sampling_defaults(model_config.sampling_defaults, path)
        self.tokenizer = load_tokenizer(resolve_model_path(config.tokenizer) if config.tokenizer else path)  # fail fast
        if lora is not None:
            weights = LoRAAdapter.load(lora).merge(weights)
        self.dtype = _resolve_dtype(config.dtype, path)
        self.kv_cache_dtype = self.dtype if config.kv_cache_dtype == "auto" else torch.float8_e4m3fn
        self.kernels = select_kernels(self.device, self.dtype, self.kv_cache_dtype, config.kernel_backend)
        max_model_len = config.max_model_len
        limit = min(model_config.max_position_embeddings, model_config.sliding_window or model_config.max_position_embeddings)
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's limit of {limit} tokens")
        max_model_len = max_model_len or limit

        torch.manual_seed(config.seed)  # parameters are overwritten; this only makes init cheap and repeatable
        with torch.device(self.device), _default_dtype(self.dtype):  # no fp32 copy of an 8B model on the GPU
            net = LlamaForCausalLM(model_config, max_position=max_model_len, kernels=self.kernels)
        net.load_weights(weights)
        net.to(self.dtype).eval()
        net.rotary.to(torch.float32)  # keep the cos/sin tables in fp32
        fast_dense = self.device.type == "cpu" and self.dtype != torch.float32 and not _cpu_has_amx()
        if fast_dense or keep_quantized:
            use_fast_cpu_matmuls(net, self.dtype, gguf_quantized_weights(path) if keep_quantized else None, fast_dense)
            net.lm_head.out_dtype = torch.float32  # logits feed the sampler in fp32 anyway

        bytes_per_token = ModelRunner.kv_bytes_per_token(model_config, self.kv_cache_dtype)
        budget = self._kv_budget(config.kv_cache_memory, config.gpu_memory_utilization,
                                 bytes_per_token * max_model_len * max_num_seqs)
        num_blocks = budget // (bytes_per_token * block_size)
        if num_blocks < 1:
            hint = ("raise kv_cache_memory" if config.kv_cache_memory is not None or self.device.type == "cpu"
                    else "free GPU memory or raise gpu_memory_utilization")
            raise ValueError(f"the KV cache budget ({budget} bytes) holds no block of {block_size} tokens "
                             f"({bytes_per_token * block_size} bytes); {hint}")
        capacity = num_blocks * block_size
        if capacity < max_model_len:
            logger.warning("KV cache holds %d tokens < max_model_len %d: capping max_model_len", capacity, max_model_len)
            max_model_len = capacity
        pool = BlockPool(num_blocks, block_size, config.enable_prefix_caching)
        async_scheduling = self.device.type == "cuda" if config.async_scheduling is None else config.async_scheduling
        self.engine = LLMEngine(net, self.tokenizer, pool, self.device, self.kv_cache_dtype, max_model_len,
                                max_num_seqs, config.max_num_batched_tokens, config.seed, async_scheduling)
        self.model_name = str(model) + (f" + LoRA {lora}" if lora else "")
        self.max_model_len = max_model_len
        if not config.enforce_eager:
            start = time.perf_counter()
            if self.engine.runner.capture_decode_graphs(max_num_seqs, max_model_len):
                logger.info("captured CUDA graphs for decode batches up to %d in %.1f s", max_num_seqs,
                            time.perf_counter() - start)
        logger.info(
            "model %s (%s, %d layers) dtype %s on %s (%s kernels); KV cache %d tokens (%s, %.2f GiB, blocks of %d); "
            "max concurrency %.1f sequences of %d tokens",
            self.model_name, model_config.model_type, model_config.num_hidden_layers, str(self.dtype).removeprefix("torch."), self.device, self.kernels.backend,
            capacity, str(self.kv_cache_dtype).removeprefix("torch."), num_blocks * block_size * bytes_per_token / 2**30, block_size, capacity / max_model_len, max_model_len,
        )

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    def _kv_budget(self, kv_cache_memory, gpu_memory_utilization: float, useful_bytes: int) -> int:
        if kv_cache_memory is not None:
            return parse_bytes(kv_cache_memory)  # EngineConfig checked it is positive
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # blocks the allocator cached while loading count as used otherwise
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = total * (1 - gpu_memory_utilization) + 2**30  # activations and allocator slack
            return max(int(free - reserve), 0)
        return min(parse_bytes(DEFAULT_CPU_KV_CACHE), useful_bytes)

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a generate/chat call without SamplingParams uses: the sampling settings of the model's
        generation_config.json (temperature, top_p, top_k, min_p, max_new_tokens), as vLLM, on top of
        SamplingParams()'s."""
        return SamplingParams(**self._sampling_defaults)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        on_finish: Callable[[int, RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for strings, token-id lists, or a mix; outputs come back in input order.
        on_finish(index, output) is called as each request finishes (to write results as they come).
        A request that cannot be served (empty, too long) gets an output with `error` set."""
        prompts = _as_list(prompts)
        results: list[RequestOutput | None] = [None] * len(prompts)
        for index, output in self._run(prompts, sampling_params, use_tqdm):
            results[index] = output
            if on_finish is not None:
                on_finish(index, output)
        return results  # type: ignore[return-value]

    def stream(
        self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Yield (input index, output) pairs in the order requests finish."""
        return self._run(_as_list(prompts), sampling_params, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate.
        The template options are apply_chat_template's."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt, chat_template, continue_final_message=continue_final_message,
                                            tools=tools, chat_template_kwargs=chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt=True, chat_template=None, *,
                            continue_final_message: bool = False, tools: list[dict] | None = None,
                            chat_template_kwargs: dict | None = None) -> list[int]:
        """Token ids of a conversation in the chat template (the model's, or chat_template). Messages may
        hold OpenAI-style text parts ([{"type": "text", "text": ...}]), joined by newlines as in vLLM.
        continue_final_message: end the prompt inside the last (assistant) message, for the model to
        continue it; tools and chat_template_kwargs go to the template as transformers passes them."""
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.model_name} has no chat template; pass chat_template=... or use generate()")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message=True continues the last message: pass add_generation_prompt=False with it")
        text = self.tokenizer.apply_chat_template(
            [_text_message(m, i) for i, m in enumerate(conversation)], tokenize=False,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message, tools=tools,
            chat_template=chat_template, **(chat_template_kwargs or {}),
        )
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template wrote any BOS itself

    def _run(self, prompts: list[Prompt], sampling_params, use_tqdm) -> Iterator[tuple[int, RequestOutput]]:
        """prompts: as _as_list returns them."""
        params = _params_for(prompts, sampling_params if sampling_params is not None else self.get_default_sampling_params())
        engine = self.engine
        if engine.has_unfinished_requests():
            raise RuntimeError("LLM.generate is not re-entrant: finish the previous generate/stream call first")
        ids, progress = {}, None
        try:  # whatever ends this generator (an error, a consumer that stops) leaves the engine empty
            for index, (prompt, p) in enumerate(zip(prompts, params)):
                request_id = str(index)
                try:
                    engine.add_request(request_id, prompt, p)
                    ids[request_id] = index
                except ValueError as exc:
                    logger.warning("%s", exc)
                    yield index, RequestOutput.from_error(request_id, prompt, str(exc))
            progress = _Progress(len(ids), use_tqdm)
            while engine.has_unfinished_requests():
                finished, stats = engine.step()
                progress.update(len(finished), stats)
                for output in finished:
                    yield ids[output.request_id], output
        finally:
            if progress is not None:
                progress.close()
            engine.abort_all()


def _text_message(message, index: int) -> dict:
    """message with OpenAI-style text parts joined into one string: templates expect a string."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError(f"message {index}: expected a dict with 'role' and 'content', got {message!r:.80}")
    content = message.get("content")
    if not isinstance(content, list):
        return message
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ValueError(f"message {index}: only text content parts ({{'type': 'text', 'text': ...}}) are "
                             f"supported, got {part!r:.80}")
    return {**message, "content": "\n".join(part["text"] for part in content)}


def _as_list(prompts) -> list[Prompt]:
    """One prompt or many (any iterable, consumed once) as a list of strings and token-id lists.
    A prompt may also be vLLM's {"prompt": text} or {"prompt_token_ids": ids}; ids may be numpy or
    torch integers."""
    if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
        prompts = [prompts]
    return [_prompt(p, index) for index, p in enumerate(prompts)]


def _is_token_ids(value) -> bool:
    if hasattr(value, "tolist") and hasattr(value, "ndim"):  # a numpy array or torch tensor
        return value.ndim == 1
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], numbers.Integral)


def _prompt(prompt, index: int) -> Prompt:
    if isinstance(prompt, dict):
        if set(prompt) not in ({"prompt"}, {"prompt_token_ids"}):
            raise ValueError(f"prompt {index}: a dict prompt holds 'prompt' (text) or 'prompt_token_ids', "
                             f"got keys {sorted(prompt)}")
        prompt = next(iter(prompt.values()))
    if isinstance(prompt, str):
        return prompt
    if hasattr(prompt, "tolist") and getattr(prompt, "ndim", None) == 1:
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)) and all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]
    raise ValueError(f"prompt {index}: expected a string or a list of token ids (integers), got {prompt!r:.80}")


def _checked_sampling_defaults(defaults: dict, path) -> dict:
    if defaults:
        try:
            SamplingParams(**defaults)
        except ValueError as exc:
            raise ValueError(f"{path}/generation_config.json: {exc}; fix or remove the setting") from None
        logger.info("requests without SamplingParams use the model's generation_config.json: %s", defaults)
    return defaults


def _params_for(prompts: list, sampling_params) -> list[SamplingParams]:
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * len(prompts)
    sampling_params = list(sampling_params)
    if len(sampling_params) != len(prompts):
        raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts; give one or one each")
    return sampling_params


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _cpu_has_amx() -> bool:
    # With AMX tiles bf16 GEMM is fast natively; without them speedx's own matmuls win (cpu_linear.py).
    return "AMX" in torch.backends.cpu.get_cpu_capability().upper()


def _resolve_dtype(dtype, path) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if is_gguf(path):
            return torch.bfloat16
        import json

        name = json.loads((path / "config.json").read_text()).get("torch_dtype") or "float32"
        return _DTYPES.get(name, torch.float32)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class _Progress:
    """Finished requests, with live prefill and decode tokens/s (over the last few seconds)."""

    WINDOW_SECONDS = 3.0

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="requests", unit="req", dynamic_ncols=True)
        self.window: deque[tuple[float, int, int]] = deque()  # (time, prefill tokens, decode tokens)
        self.last_refresh = 0.0

    def update(self, finished: int, stats) -> None:
        if self.bar is None:
            return
        self.bar.update(finished)
        now = time.perf_counter()
        self.window.append((now, stats.num_prefill_tokens, stats.num_decode_tokens))
        while now - self.window[0][0] > self.WINDOW_SECONDS and len(self.window) > 1:
            self.window.popleft()
        if now - self.last_refresh > 0.5:
            span = max(now - self.window[0][0] + stats.seconds, 1e-9)
            prefill = sum(p for _, p, _ in self.window) / span
            decode = sum(d for _, _, d in self.window) / span
            self.bar.set_postfix_str(f"prefill {prefill:,.0f} tok/s, decode {decode:,.0f} tok/s")
            self.last_refresh = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
