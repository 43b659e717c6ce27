"""A real checkpoint (all-MiniLM-L6-v2): build / load_ into BertModel, and into an encoder of our own."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import weightsmith as ws

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 1997, 1996, 2299, 102],
                    [101, 2023, 2003, 2178, 6251, 102, 0, 0, 0, 0]])
MASK = (IDS != 0).long()


@pytest.fixture(scope="module")
def reference(minilm_dir):
    model = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK)
    return model, out


def config(minilm_dir):
    return transformers.BertConfig.from_pretrained(minilm_dir)


def outputs(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS, attention_mask=MASK)


def assert_same_outputs(model, reference):
    _, ref = reference
    out = outputs(model)
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max() <= 1e-6
    assert (out.pooler_output - ref.pooler_output).abs().max() <= 1e-6


def test_build_matches_from_pretrained(minilm_dir, reference):
    model, report = ws.build(lambda: transformers.BertModel(config(minilm_dir)), minilm_dir)

    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert_same_outputs(model, reference)
    assert report.coverage == 1.0 and report.filled == 0
    assert set(report.unused) == {"embeddings.position_ids"}


def test_load_into_a_fresh_model_matches_from_pretrained(minilm_dir, reference):
    torch.manual_seed(0)
    model = transformers.BertModel(config(minilm_dir))
    assert (outputs(model).last_hidden_state - reference[1].last_hidden_state).abs().max() > 0.1

    report = ws.load_(model, minilm_dir)  # strict: every key is accounted for

    assert_same_outputs(model, reference)
    assert report.loaded == len(model.state_dict())


def test_the_plan_explains_every_key(minilm_dir):
    with torch.device("meta"):
        model = transformers.BertModel(config(minilm_dir))
    p = ws.plan(model, minilm_dir)

    assert p.problems == [] and p.ambiguous == [] and p.missing == []
    assert p.counts() == {"exact": len(model.state_dict())}
    assert all(s.sources == (s.target,) and not s.transforms for s in p.steps)
    (unused,) = p.unused
    assert unused.key == "embeddings.position_ids" and unused.expected
    assert "computes this buffer itself" in unused.reason
    assert "unused source embeddings.position_ids" in str(p)


# -- an encoder of our own, with one fused qkv per block ------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads) + bias
        return self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.attn = Attention(dim, heads)
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, hidden), "fc2": nn.Linear(hidden, dim)})
        self.ln2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x, bias))  # post-LN, as in BERT
        return self.ln2(x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](x))))


class Encoder(nn.Module):
    def __init__(self, vocab=30522, dim=384, depth=6, heads=12, hidden=1536, positions=512, eps=1e-12) -> None:
        super().__init__()
        self.embed = nn.ModuleDict({"tok": nn.Embedding(vocab, dim), "pos": nn.Embedding(positions, dim),
                                    "seg": nn.Embedding(2, dim), "ln": nn.LayerNorm(dim, eps=eps)})
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, eps) for _ in range(depth))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1])
        e = self.embed
        x = e["ln"](e["tok"](ids) + e["pos"](pos) + e["seg"](torch.zeros_like(ids)))
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for block in self.blocks:
            x = block(x, bias)
        return x


def real_tokens_diff(out: torch.Tensor, reference) -> float:
    # padded positions attend to nothing real and differ between attention kernels: compare the tokens
    keep = MASK.bool()
    return (out[keep] - reference[1].last_hidden_state[keep]).abs().max().item()


RULES = """
[[rename]]
source = "embeddings.word_embeddings"
target = "embed.tok"

[[rename]]
source = "embeddings.position_embeddings"
target = "embed.pos"

[[rename]]
source = "embeddings.token_type_embeddings"
target = "embed.seg"

[[rename]]
source = "embeddings.LayerNorm"
target = "embed.ln"

[[rename]]
source = ["encoder.layer.{i}.attention.self.query",
          "encoder.layer.{i}.attention.self.key",
          "encoder.layer.{i}.attention.self.value"]
target = "blocks.{i}.attn.qkv"
transform = "cat(0)"

[[rename]]
source = "encoder.layer.{i}.attention.output.dense"
target = "blocks.{i}.attn.proj"

[[rename]]
source = "encoder.layer.{i}.attention.output.LayerNorm"
target = "blocks.{i}.ln1"

[[rename]]
source = "encoder.layer.{i}.intermediate.dense"
target = "blocks.{i}.mlp.fc1"

[[rename]]
source = "encoder.layer.{i}.output.dense"
target = "blocks.{i}.mlp.fc2"

[[rename]]
source = "encoder.layer.{i}.output.LayerNorm"
target = "blocks.{i}.ln2"
"""


def test_our_own_encoder_with_fused_qkv_matches_transformers(tmp_path, minilm_dir, reference):
    rules = tmp_path / "minilm.toml"
    rules.write_text(RULES)
    torch.manual_seed(0)
    model = Encoder().eval()

    report = ws.load_(model, minilm_dir, rename=rules, strict=False)  # our encoder has no pooler

    with torch.no_grad():
        out = model(IDS, MASK)
    assert real_tokens_diff(out, reference) <= 1e-5
    assert report.filled == 0 and report.coverage == 1.0
    assert report.provenance["blocks.5.attn.qkv.weight"] == (
        "encoder.layer.5.attention.self.query.weight, encoder.layer.5.attention.self.key.weight, "
        "encoder.layer.5.attention.self.value.weight + cat(0)")
    assert set(report.unused) == {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}


def test_our_own_encoder_builds_from_the_file_too(tmp_path, minilm_dir, reference):
    rules = tmp_path / "minilm.toml"
    rules.write_text(RULES)

    model, report = ws.build(Encoder, minilm_dir, rename=rules, strict=False)

    assert not any(t.is_meta for t in model.parameters())
    with torch.no_grad():
        out = model.eval()(IDS, MASK)
    assert real_tokens_diff(out, reference) <= 1e-5


# -- into a model with another head: BertForMaskedLM -------------------------------------------------
def mlm(minilm_dir):
    return transformers.BertForMaskedLM(config(minilm_dir))


@pytest.mark.parametrize("match", ["exact", "auto"])
def test_the_pooler_never_goes_into_the_mlm_head(minilm_dir, match):
    with torch.device("meta"):
        model = mlm(minilm_dir)

    p = ws.plan(model, minilm_dir, match=match)

    steps = {s.target: s for s in p.steps}
    head = [t for t in steps if t.startswith("cls.predictions.transform.")]
    assert head and all(steps[t].how == "missing" for t in head)
    assert not any("pooler" in k for s in p.loaded for k in s.sources)
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= {u.key for u in p.unused}
    if match == "auto":  # the candidate is named, with its reason, never taken
        (amb,) = p.ambiguous
        assert "pooler.dense (" in amb and "cls.predictions.transform.dense (" in amb and "[384, 384]" in amb
        assert "went under 'bert'" in amb
    assert p.verdict().startswith("a strict load refuses it")
    assert p.verdict(strict=False).startswith("ready")


def test_new_keys_of_a_transformers_model_are_initialized_as_from_pretrained_does(minilm_dir):
    reference = transformers.BertForMaskedLM.from_pretrained(minilm_dir)  # its own _init_weights for the head
    torch.manual_seed(0)

    model, report = ws.build(lambda: mlm(minilm_dir), minilm_dir, strict=False, match="auto")

    dense, ref_dense = model.cls.predictions.transform.dense, reference.cls.predictions.transform.dense
    assert torch.equal(dense.bias, torch.zeros(384)) and torch.equal(ref_dense.bias, torch.zeros(384))
    std = config(minilm_dir).initializer_range
    assert abs(dense.weight.std().item() - std) < 0.05 * std
    assert abs(ref_dense.weight.std().item() - std) < 0.05 * std
    assert abs(dense.weight.mean().item()) < 0.05 * std
    assert torch.equal(model.cls.predictions.transform.LayerNorm.weight, torch.ones(384))
    assert torch.equal(model.cls.predictions.bias, torch.zeros(30522))
    assert not torch.equal(dense.weight, model.bert.embeddings.word_embeddings.weight[:384])
    assert report.provenance["cls.predictions.transform.dense.weight"] == "_init_weights"
    # the encoder is the checkpoint's: same hidden states as from_pretrained
    with torch.no_grad():
        ours = model.eval().bert(input_ids=IDS, attention_mask=MASK).last_hidden_state
        theirs = reference.eval().bert(input_ids=IDS, attention_mask=MASK).last_hidden_state
    assert (ours - theirs).abs().max() <= 1e-6


def test_warmstart_cli_writes_the_mlm_head_from_its_own_init_not_the_pooler(minilm_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import sys

    from weightsmith.cli import cli

    (tmp_path / "ws_bert_mlm.py").write_text(
        "import transformers\n"
        f"def model():\n    config = transformers.BertConfig.from_pretrained({str(minilm_dir)!r})\n"
        "    return transformers.BertForMaskedLM(config)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mlm.safetensors"
    try:
        result = CliRunner().invoke(cli, ["warmstart", str(minilm_dir), "--into", "ws_bert_mlm:model", "-o", str(out),
                                          "--match", "auto"])
        plan = CliRunner().invoke(cli, ["plan", str(minilm_dir), "--into", "ws_bert_mlm:model", "--match", "auto"])
    finally:
        sys.modules.pop("ws_bert_mlm", None)
    assert result.exit_code == 0, result.output
    written = ws.open(out).load()
    pooler = ws.open(minilm_dir).tensor("pooler.dense.weight")
    assert not torch.equal(written["cls.predictions.transform.dense.weight"], pooler)
    assert torch.equal(written["cls.predictions.transform.dense.bias"], torch.zeros(384))
    assert plan.exit_code == 1 and "ambiguous: pooler.dense" in plan.output
