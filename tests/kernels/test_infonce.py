"""Fused InfoNCE: the Triton kernel (interpreted on CPU) vs its PyTorch twin vs a hand-written
reference, the sentence-transformers loss vs MultipleNegativesRankingLoss, gathering documents
across processes, and the errors bad inputs raise."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from speedx.embed import InfoNCELoss, infonce_loss, infonce_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:  # without CUDA, conftest.py imported triton interpreted (the mode is fixed at its first import)
    from speedx.kernels.triton_jit import interpreter_active


@pytest.fixture(scope="module")
def fused():
    """speedx.kernels.infonce: its kernels interpreted on CPU tensors, compiled on CUDA."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if DEVICE == "cpu" and not interpreter_active():
        pytest.skip("triton was imported compiled before this module: CPU tensors need the interpreter")
    import speedx.kernels.infonce as module

    return module


def make_batch(B, k, D, layout, masked, seed=0):
    """Unnormalized q [B, D], d [N, D] and labels for a layout:
    blocks: d = cat(positives, negatives_1, ..., negatives_k), labels = arange(B);
    grouped: each query's (positive, its k negatives) contiguous, labels = arange(B) * (1 + k);
    random: N = 123 documents in any order, labels distinct random columns."""
    gen = torch.Generator().manual_seed(seed)
    N = 123 if layout == "random" else B * (1 + k)
    q = torch.randn(B, D, generator=gen)
    d = torch.randn(N, D, generator=gen)
    if layout == "random":
        labels = torch.randperm(N, generator=gen)[:B]
    else:
        labels = torch.arange(B) * (1 if layout == "blocks" else 1 + k)
    d[labels] += 0.5 * q  # positives a bit closer, so the softmax is not flat
    ids = None
    if masked:  # false negatives, as near-copies: queries 0 and 1 share a positive, another column is query 3's
        ids = torch.arange(N)
        spare = [j for j in range(N) if j not in set(labels.tolist())]
        for copy, original in ((labels[1], labels[0]), (spare[len(spare) // 2], labels[3])):
            ids[copy] = ids[original]
            d[copy] = d[original] + 0.01 * torch.randn(D, generator=gen)
    return q, d, labels, ids


def handwritten(q, d, labels, scale, ids=None):
    """The formula, row by row, in float64."""
    q, d = q.double(), d.double()
    total = 0.0
    for i in range(q.shape[0]):
        cos = (d @ q[i]) / (d.norm(dim=1) * q[i].norm())
        logits = scale * cos
        if ids is not None:
            drop = (ids == ids[labels[i]]) & (torch.arange(d.shape[0]) != labels[i])
            logits = logits[~drop]
            label = int(labels[i]) - int(drop[: labels[i]].sum())
        else:
            label = int(labels[i])
        total = total + torch.logsumexp(logits, 0) - logits[label]
    return total / q.shape[0]


def loss_and_grads(backend, q, d, labels, ids, scale=50.0, device="cpu"):
    # Fresh leaves per call: q.to("cpu") is q itself, whose .grad would accumulate across calls and be
    # the very tensor an earlier call returned.
    q, d = q.detach().clone().to(device).requires_grad_(), d.detach().clone().to(device).requires_grad_()
    labels, ids = labels.to(device), ids.to(device) if ids is not None else None
    s = torch.tensor(scale, device=device, requires_grad=True)
    loss = infonce_loss(q, d, labels, scale=s, backend=backend, document_ids=ids)
    loss.backward()
    return loss.detach(), q.grad, d.grad, s.grad


def assert_same(a, b, tol=2e-5):
    for x, y, name in zip(a, b, ("loss", "dq", "dd", "dscale")):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("layout,k,masked", [("blocks", 0, False), ("grouped", 2, False), ("blocks", 2, True),
                                             ("grouped", 1, True), ("random", 0, False), ("random", 0, True)])
def test_twin_matches_handwritten(layout, k, masked):
    q, d, labels, ids = make_batch(9, k, 16, layout, masked)
    got = infonce_loss(q, d, labels, scale=20.0, backend="torch", document_ids=ids)
    torch.testing.assert_close(got.double(), handwritten(q, d, labels, 20.0, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", [64, 384])
@pytest.mark.parametrize("layout,k,masked", [("random", 0, False), ("random", 0, True), ("blocks", 0, False),
                                             ("blocks", 2, True), ("grouped", 2, False), ("grouped", 1, True)])
def test_kernel_matches_twin(fused, D, layout, k, masked):
    q, d, labels, ids = make_batch(47, k, D, layout, masked)  # 47 x 123 / 47 / 141 / 94: no whole tiles
    assert_same(loss_and_grads("triton", q, d, labels, ids, device=DEVICE),
                loss_and_grads("torch", q, d, labels, ids, device=DEVICE))


def test_kernel_in_row_chunks(fused, monkeypatch):
    """A workspace smaller than B x N: the rows are walked in chunks (13, 12, 12, 12 of 49, none a tile
    multiple), and D = 50 is no tile multiple."""
    q, d, labels, ids = make_batch(49, 3, 50, "grouped", True)
    monkeypatch.setattr(fused, "WORKSPACE_BYTES", 13 * d.shape[0] * 4)
    assert fused.chunk_rows(49, d.shape[0]) == 13
    assert_same(loss_and_grads("triton", q, d, labels, ids, scale=30.0, device=DEVICE),
                loss_and_grads("torch", q, d, labels, ids, scale=30.0, device=DEVICE))


def test_kernel_bf16_in_row_chunks(fused, monkeypatch):
    """bf16 over several row chunks (dd summed over them in bf16): as close to the twin run in fp32 on
    the same bf16 values as the twin in bf16 is."""
    q, d, labels, ids = make_batch(300, 3, 128, "grouped", True)
    q, d = q.bfloat16(), d.bfloat16()
    monkeypatch.setattr(fused, "WORKSPACE_BYTES", 60 * d.shape[0] * 4)  # 5 chunks of 60 rows
    exact = loss_and_grads("torch", q.float(), d.float(), labels, ids, device=DEVICE)

    def relative_errors(backend):
        got = loss_and_grads(backend, q, d, labels, ids, device=DEVICE)
        return [((x.float() - y).abs().max() / y.abs().max()).item() for x, y in zip(got, exact)]

    fused_errors, twin_errors = relative_errors("triton"), relative_errors("torch")
    assert all(f <= max(2 * t, 1e-2) for f, t in zip(fused_errors, twin_errors)), (fused_errors, twin_errors)


def test_gradients_only_when_wanted(fused):
    """Under no_grad only the log-sum-exp pass runs (same loss); a second backward through one forward
    raises instead of handing out the gradients again."""
    q, d, labels, ids = make_batch(47, 2, 64, "blocks", True)
    with torch.no_grad():
        no_grad = infonce_loss(q.to(DEVICE), d.to(DEVICE), labels.to(DEVICE), backend="triton",
                               document_ids=ids.to(DEVICE))
    torch.testing.assert_close(no_grad, loss_and_grads("torch", q, d, labels, ids, device=DEVICE)[0])
    q = q.to(DEVICE).requires_grad_()
    loss = infonce_loss(q, d.to(DEVICE), labels.to(DEVICE), backend="triton")
    (2 * loss).backward(retain_graph=True)
    torch.testing.assert_close(q.grad, 2 * loss_and_grads("torch", q, d, labels, None, device=DEVICE)[1])
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


COMPILE_FOR_GPUS = """
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import speedx.kernels.infonce as k

nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
for cap in (80, 90):
    for fn, (block_m, block_n, warps) in ((k._row_lse_kernel, k.LSE_TILE), (k._softmax_grad_kernel, k.GRAD_TILE)):
        consts = dict(HAS_IDS=True, SCALE_GRAD=True, BLOCK_M=block_m, BLOCK_N=block_n)
        consts = {name: value for name, value in consts.items() if name in fn.arg_names}
        types = dict(G_ptr="*bf16", labels_ptr="*i64", ids_ptr="*i64", label_ids_ptr="*i64", row_weight="fp32")
        sig = {n: "constexpr" if n in consts else types.get(n, "*fp32" if n.endswith("_ptr") else "i32")
               for n in fn.arg_names}
        # what the JIT specializes at run time for N = 57344: aligned pointers, and every int it may
        # specialize (not in the kernel's do_not_specialize) a multiple of 16
        fixed = {p.name for p in fn.params if p.do_not_specialize} | set(consts) | {"row_weight"}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in fixed}
        compiled = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", cap, 32),
                                  options=dict(num_warps=warps))
        if cap != 90 or not os.path.exists(nvdisasm):
            continue
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
        # they stream B x N rows: 16-byte loads and stores, never scalar ones (as with n_cols unspecialized)
        assert len(re.findall(r"LDG\\.E\\.128", sass)) >= 4, f"{fn.__name__}: S is not read 16 bytes at a time"
        assert "STG.E.U16" not in sass, f"{fn.__name__}: G is stored one bf16 at a time"
    sig = dict(x_ptr="*bf16", scale_ptr="*fp32", n="i32", BLOCK="constexpr")
    triton.compile(ASTSource(k._scale_kernel, sig, constexprs=dict(BLOCK=k.SCALE_BLOCK)), target=GPUTarget("cuda", cap, 32))
"""


def test_kernels_compile_for_gpus(tmp_path):
    """The interpreter is lenient: compile the kernels to sm_80 / sm_90 cubins as the JIT specializes
    them, no GPU needed, and (with the triton wheel's nvdisasm) check the two row kernels' memory accesses
    are vectorized."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPUS], env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_kernel_is_deterministic(fused):
    q, d, labels, ids = make_batch(47, 2, 64, "blocks", True)
    first, second = (loss_and_grads("triton", q, d, labels, ids, device=DEVICE) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_learnable_scale_is_learned():
    q, d, labels, _ = make_batch(8, 1, 16, "blocks", False)
    scale = torch.nn.Parameter(torch.tensor(10.0))
    loss = infonce_loss(q, d, labels, scale=scale)
    loss.backward()
    assert scale.grad is not None and scale.grad.abs() > 0
    # d loss / d s = mean_i(E_softmax[cos_i] - cos(q_i, d_label))
    cos = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T
    expected = ((cos.mul(10.0).softmax(-1) * cos).sum(-1) - cos[torch.arange(8), labels]).mean()
    torch.testing.assert_close(scale.grad, expected)


# --- sentence-transformers --------------------------------------------------------------------


def tiny_sentence_transformer(tmp_path):
    """A SentenceTransformer on a tiny random BERT + mean pooling, built in code (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    words = ["the", "a", "quick", "fox", "dog", "robot", "sky", "paints", "jumps", "over", "query", "document",
             "model", "learns", "space", "hard"]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # no dropout: two forwards give the same embeddings
    BertModel(config).save_pretrained(tmp_path)
    return SentenceTransformer(modules=[Transformer(str(tmp_path), max_seq_length=16), Pooling(32, "mean")],
                               device="cpu")


@pytest.mark.parametrize("columns", [2, 4])
def test_matches_multiple_negatives_ranking_loss(tmp_path, columns):
    pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    model = tiny_sentence_transformer(tmp_path)
    texts = [["the quick fox", "a robot paints", "the dog jumps", "query document"],
             ["fox jumps over", "robot sky", "dog the", "document model"],
             ["sky paints", "hard query", "model learns", "space"],
             ["the a", "learns space", "fox fox dog", "over the sky"]]
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    features = [preprocess(column) for column in texts[:columns]]

    ours = InfoNCELoss(model, scale=50.0, backend="torch")
    theirs = MultipleNegativesRankingLoss(model, scale=50.0)
    value = ours(features, None)
    torch.testing.assert_close(value, theirs(features, None), rtol=1e-5, atol=1e-5)
    param = next(model.parameters())
    (grad,) = torch.autograd.grad(value, param)
    (expected,) = torch.autograd.grad(theirs(features, None), param)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))  # fp32 roundoff
    assert ours.get_config_dict()["scale"] == 50.0 and "1807.03748" in ours.citation


# --- across processes -------------------------------------------------------------------------


def _init_gloo(rank, world, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    return dist


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gather_single_process_equals_local(request, tmp_path, backend):
    if backend == "triton":
        request.getfixturevalue("fused")  # skips without triton (or without its interpreter on CPU)
    # On a CUDA machine the batch is on the GPU (the Triton path needs it there; gloo gathers CUDA tensors).
    q, d, labels, ids = (t.to(DEVICE) for t in make_batch(11, 2, 16, "grouped", True))
    dist = _init_gloo(0, 1, tmp_path / "store")
    try:
        gathered = loss_and_grads_gather(q, d, labels, ids, gather=True, backend=backend)
    finally:
        dist.destroy_process_group()
    assert_same(gathered, loss_and_grads_gather(q, d, labels, ids, gather=False))


def loss_and_grads_gather(q, d, labels, ids, gather, backend="torch"):
    q, d = q.clone().requires_grad_(), d.clone().requires_grad_()
    s = torch.tensor(30.0, device=q.device, requires_grad=True)
    loss = infonce_loss(q, d, labels, scale=s, backend=backend, document_ids=ids, gather_across_processes=gather)
    loss.backward()
    return loss.detach(), q.grad, d.grad, s.grad


def two_rank_batch():
    """12 queries and 24 documents over 2 ranks: rank r holds queries 6r..6r+5, then their positives and
    negatives; rank 1's first negative is a copy of rank 0's first positive (same document id)."""
    q, d, _, _ = make_batch(12, 1, 16, "blocks", False, seed=3)
    docs = torch.cat([d[:12].view(2, 6, 16), d[12:].view(2, 6, 16)], dim=1)  # [rank, positives + negatives, D]
    ids = torch.arange(24).view(2, 12)
    docs[1, 6], ids[1, 6] = docs[0, 0], ids[0, 0]
    return q.view(2, 6, 16), docs, ids


def _rank_worker(rank, world, path, out_dir):
    _init_gloo(rank, world, path)
    q, docs, ids = two_rank_batch()
    result = loss_and_grads_gather(q[rank], docs[rank], torch.arange(6), ids[rank], gather=True)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_gather_two_processes(tmp_path):
    """Each rank scores its 6 queries against all 24 documents, labels local; the gradients reach the
    documents' owners: rank r's dd is the gradient of loss_0 + loss_1 for its documents."""
    torch.multiprocessing.spawn(_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    q, docs, ids = two_rank_batch()
    q, docs = q.reshape(12, 16).requires_grad_(), docs.reshape(24, 16).requires_grad_()  # the gathered order
    s = torch.tensor(30.0, requires_grad=True)
    targets = torch.tensor([r * 12 + i for r in range(2) for i in range(6)])
    losses = [infonce_torch(F.normalize(q[r * 6:(r + 1) * 6], dim=-1), F.normalize(docs, dim=-1),
                            targets[r * 6:(r + 1) * 6], s, ids.reshape(24)) for r in range(2)]
    sum(losses).backward()
    for r, (loss, dq, dd, _) in enumerate(results):
        torch.testing.assert_close(loss, losses[r].detach())
        torch.testing.assert_close(dq, q.grad[r * 6:(r + 1) * 6])
        torch.testing.assert_close(dd, docs.grad[r * 12:(r + 1) * 12])
    torch.testing.assert_close(results[0][3] + results[1][3], s.grad)


# --- bad inputs and imports -------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    (dict(labels=torch.tensor([0, 1, 9])), r"labels must lie in \[0, 6\)"),
    (dict(labels=torch.tensor([0, -1, 2])), r"labels must lie in \[0, 6\)"),
    (dict(labels=torch.tensor([0, 1])), r"labels must be a 1-D integer tensor of length 3"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0])), r"labels must be a 1-D integer"),
    (dict(d=torch.randn(6, 5)), r"same embedding dim"),
    (dict(q=torch.randn(8)), r"must be 2-D"),
    (dict(document_ids=torch.arange(5)), r"document_ids must be a 1-D integer tensor of length 6"),
    (dict(scale=0.0), r"scale must be a positive"),
    (dict(scale=torch.ones(2)), r"scale must be a single value"),
    (dict(backend="cuda"), r"backend must be one of"),
])
def test_bad_inputs_raise(change, message):
    args = dict(q=torch.randn(3, 8), d=torch.randn(6, 8), labels=torch.tensor([0, 1, 2]))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        infonce_loss(**args)


def test_import_and_cpu_path_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, speedx, speedx.embed\n"
        "loss = speedx.embed.infonce_loss(torch.randn(4, 8), torch.randn(4, 8), torch.arange(4))\n"
        "assert torch.isfinite(loss), loss\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
