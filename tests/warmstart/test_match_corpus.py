"""A corpus of model pairs with a table of truth: structural matching pairs nothing wrongly.

Each pair is a source and a target built from small configs: transformers models into their
task variants (a base prefix added or stripped, new heads), and renamed copies written here
(the same modules in the same order under other names, with other nesting) of BERT, RoBERTa,
DistilBERT, ELECTRA, T5's encoder, ViT, a ResNet-style and a ViT-style model, and a GPT written
with ``nn.Linear`` against GPT-2's ``Conv1D``. For every target tensor the truth says which
source tensor it is (or that it is new); the test counts wrong pairings (must be 0) and
coverage (the share of the tensors the truth pairs that the plan pairs).

``python tests/warmstart/test_match_corpus.py`` prints the table the README shows.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import weightsmith as ws

transformers = pytest.importorskip("transformers")

H, LAYERS, HEADS, FF, VOCAB, POS = 32, 2, 2, 64, 99, 40


# -- renamed copies ---------------------------------------------------------------------------------
def renamed(model: nn.Module, rules: list[tuple[str, str]]) -> tuple[nn.Module, Callable[[str], str]]:
    """The same modules in the same order under new paths (regex rules on module paths, applied in turn).

    Leaf modules keep their class (a Linear stays a Linear); a module holding tensors and children
    becomes a plain container of its own tensors. Tied Parameters stay tied.
    """

    def rename(path: str) -> str:
        for pat, rep in rules:
            path = re.sub(pat, rep, path)
        return path

    root = nn.Module()

    def put(path: str, module: nn.Module) -> None:
        owner = root
        parts = path.split(".")
        for p in parts[:-1]:
            if not hasattr(owner, p) or getattr(owner, p) is None:
                owner.add_module(p, nn.Module())
            owner = getattr(owner, p)
        owner.add_module(parts[-1], module)

    for path, mod in model.named_modules():
        own_p = dict(mod.named_parameters(recurse=False))
        own_b = {n: b for n, b in mod.named_buffers(recurse=False) if n not in mod._non_persistent_buffers_set}
        if not own_p and not own_b:
            continue
        if not list(mod.children()):
            new = copy.copy(mod)
            new._parameters = dict(mod._parameters)  # the same Parameters: ties survive
            new._buffers = dict(mod._buffers)
            new._modules = {}
        else:
            new = nn.Module()
            for n, p in own_p.items():
                new.register_parameter(n, p)
            for n, b in own_b.items():
                new.register_buffer(n, b)
        if path and rename(path):
            put(rename(path), new)
        else:  # tensors of the root itself stay on the root
            for n, t in [*own_p.items(), *own_b.items()]:
                (root.register_parameter if n in own_p else root.register_buffer)(n, t)

    def rename_key(key: str) -> str:
        mod, _, leaf = key.rpartition(".")
        new = rename(mod) if mod else ""
        return f"{new}.{leaf}" if new else leaf

    return root, rename_key


# -- the models ---------------------------------------------------------------------------------------
def bert_cfg():
    return transformers.BertConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                   intermediate_size=FF, vocab_size=VOCAB, max_position_embeddings=POS)


def roberta_cfg():
    return transformers.RobertaConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      intermediate_size=FF, vocab_size=VOCAB, max_position_embeddings=POS)


def distil_cfg():
    return transformers.DistilBertConfig(dim=H, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FF, vocab_size=VOCAB,
                                         max_position_embeddings=POS)


def electra_cfg():
    return transformers.ElectraConfig(hidden_size=H, embedding_size=16, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, intermediate_size=FF, vocab_size=VOCAB,
                                      max_position_embeddings=POS)


def gpt2_cfg():
    return transformers.GPT2Config(n_embd=H, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=POS,
                                   bos_token_id=0, eos_token_id=0)


def t5_cfg():
    return transformers.T5Config(d_model=H, d_kv=8, d_ff=FF, num_layers=LAYERS, num_heads=HEADS, vocab_size=VOCAB)


def vit_cfg():
    return transformers.ViTConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=FF, image_size=16, patch_size=4, num_labels=3)


BERT_RULES = [(r"^embeddings\.word_embeddings$", "embed.tok"), (r"^embeddings\.position_embeddings$", "embed.pos"),
              (r"^embeddings\.token_type_embeddings$", "embed.seg"), (r"^embeddings\.LayerNorm$", "embed.norm"),
              (r"^encoder\.layer\.", "blocks."), (r"attention\.self\.query$", "attn.q"),
              (r"attention\.self\.key$", "attn.k"), (r"attention\.self\.value$", "attn.v"),
              (r"attention\.output\.dense$", "attn.proj"), (r"attention\.output\.LayerNorm$", "ln1"),
              (r"intermediate\.dense$", "mlp.fc1"), (r"output\.dense$", "mlp.fc2"), (r"output\.LayerNorm$", "ln2"),
              (r"^pooler\.dense$", "pool.proj")]
DISTIL_RULES = [(r"^embeddings\.word_embeddings$", "tok"), (r"^embeddings\.position_embeddings$", "pos"),
                (r"^embeddings\.LayerNorm$", "emb_norm"), (r"^transformer\.layer\.", "layers."),
                (r"attention\.q_lin$", "attn.q"), (r"attention\.k_lin$", "attn.k"), (r"attention\.v_lin$", "attn.v"),
                (r"attention\.out_lin$", "attn.o"), (r"sa_layer_norm$", "norm1"), (r"ffn\.lin1$", "ff.up"),
                (r"ffn\.lin2$", "ff.down"), (r"output_layer_norm$", "norm2")]
T5_RULES = [(r"^shared$", "embed"), (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.", r"layers.\1.attn."),
            (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm$", r"layers.\1.attn_norm"),
            (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi$", r"layers.\1.ff.w_in"),
            (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo$", r"layers.\1.ff.w_out"),
            (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm$", r"layers.\1.ff_norm"),
            (r"^encoder\.final_layer_norm$", "norm"), (r"^encoder\.embed_tokens$", "embed_again")]
VIT_RULES = [(r"^embeddings\.patch_embeddings\.projection$", "patch_embed.proj"), (r"^embeddings$", "tokens"),
             (r"^layers\.", "blocks."), (r"attention\.q_proj$", "attn.query"), (r"attention\.k_proj$", "attn.key"),
             (r"attention\.v_proj$", "attn.value"), (r"attention\.o_proj$", "attn.out"),
             (r"layernorm_before$", "norm1"), (r"layernorm_after$", "norm2"), (r"mlp\.fc1$", "ffn.up"),
             (r"mlp\.fc2$", "ffn.down"), (r"^layernorm$", "norm"), (r"^pooler\.dense$", "head.pre_logits")]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """torchvision's layout and names (conv1, bn1, layer1..4, fc), at toy widths."""

    def __init__(self, classes: int = 10, widths: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, w in enumerate(widths, 1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, w, 1 if i == 1 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.fc = nn.Linear(cin, classes)


RESNET_RULES = [(r"^conv1$", "stem.conv"), (r"^bn1$", "stem.norm"),
                (r"^layer(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks."),
                (r"\.conv(\d)$", r".conv\1.conv"), (r"\.bn(\d)$", r".conv\1.bn"),
                (r"\.downsample\.0$", ".shortcut.conv"),
                (r"\.downsample\.1$", ".shortcut.bn"), (r"^fc$", "head.fc")]


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))


class VitBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class TinyViT(nn.Module):
    """timm's ViT layout and names (separate q, k, v), at toy size."""

    def __init__(self, dim: int = H, depth: int = 3, patch: int = 4, grid: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.ModuleList(VitBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)


TINYVIT_RULES = [(r"^patch_embed\.proj$", "stem.patchify"), (r"^blocks\.", "encoder.layers."),
                 (r"\.norm1$", ".pre_attn_norm"), (r"\.attn\.q$", ".mixer.query"), (r"\.attn\.k$", ".mixer.key"),
                 (r"\.attn\.v$", ".mixer.value"), (r"\.attn\.proj$", ".mixer.out"), (r"\.norm2$", ".pre_mlp_norm"),
                 (r"\.mlp\.0$", ".mlp.up"), (r"\.mlp\.2$", ".mlp.down"), (r"^norm$", "final_norm"),
                 (r"^head$", "classifier")]


class GPT(nn.Module):
    """A GPT written with nn.Linear (weights [out, in]) and its own names, GPT-2's module order."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, H)
        self.pos = nn.Embedding(POS, H)
        self.blocks = nn.ModuleList()
        for _ in range(LAYERS):
            b = nn.Module()
            b.ln1 = nn.LayerNorm(H)
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(H, 3 * H), nn.Linear(H, H)
            b.ln2 = nn.LayerNorm(H)
            b.mlp = nn.Module()
            b.mlp.fc, b.mlp.proj = nn.Linear(H, 4 * H), nn.Linear(4 * H, H)
            self.blocks.append(b)
        self.norm_f = nn.LayerNorm(H)
        self.head = nn.Linear(H, VOCAB, bias=False)
        self.head.weight = self.tok.weight


def gpt_truth(target_key: str) -> tuple[str | None, bool]:
    m = re.match(r"blocks\.(\d+)\.(.*)", target_key)
    if m:
        i, rest = m.groups()
        names = {"ln1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln2": "ln_2",
                 "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
        mod, leaf = rest.rsplit(".", 1)
        flip = leaf == "weight" and mod not in ("ln1", "ln2")
        return f"h.{i}.{names[mod]}.{leaf}", flip
    top = {"tok.weight": "wte.weight", "pos.weight": "wpe.weight", "norm_f.weight": "ln_f.weight",
           "norm_f.bias": "ln_f.bias"}
    return top.get(target_key), False


def hf_vit_into_timm_style():
    """transformers' ViT into the timm-style ViT: other names, and the norms in another order."""
    torch.manual_seed(0)
    names = {"norm1": "layernorm_before", "attn.q": "attention.q_proj", "attn.k": "attention.k_proj",
             "attn.v": "attention.v_proj", "attn.proj": "attention.o_proj", "norm2": "layernorm_after",
             "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
    top = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}

    def truth(k: str) -> tuple[str | None, bool]:
        m = re.match(r"blocks\.(\d+)\.(.*)\.(weight|bias)$", k)
        if m:
            return f"layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}", False
        return top.get(k), False

    return transformers.ViTModel(vit_cfg()), TinyViT(depth=LAYERS, classes=3), truth


# -- the corpus ---------------------------------------------------------------------------------------
@dataclass
class Pair:
    name: str
    family: str
    make: Callable[[], tuple[nn.Module, nn.Module, Callable[[str], tuple[str | None, bool]]]]
    file: str = ""          # the source as a file: "weightsmith" (module order kept) or "sorted" (safetensors'
                            # own writer, names sorted: module order lost)
    renamed: bool = False   # a renamed architecture (coverage goal: >= 95%)
    reordered: bool = False  # another module order too: only "never wrong" is asked


def by_prefix(source: nn.Module, target: nn.Module, base: str):
    """Truth for a base model and its task variant: the same names, ``base.`` added or stripped."""
    sstate, tstate = source.state_dict(), target.state_dict()

    def truth(k: str) -> tuple[str | None, bool]:
        for cand in (k, k.removeprefix(base + "."), f"{base}.{k}"):
            if cand in sstate and sstate[cand].shape == tstate[k].shape:  # a head of another size is new
                return cand, False
        return None, False

    return source, target, truth


def by_rename(make_source: Callable[[], nn.Module], rules):
    source = make_source()
    twin = make_source()
    target, rename = renamed(twin, rules)
    inverse = {rename(k): k for k in twin.state_dict()}
    return source, target, lambda k: (inverse.get(k), False)


def hf(cls_name: str, cfg: Callable[[], object]) -> Callable[[], nn.Module]:
    def make():
        torch.manual_seed(0)
        return getattr(transformers, cls_name)(cfg())
    return make


def variant(src: str, tgt: str, cfg, base: str):
    return lambda: by_prefix(hf(src, cfg)(), hf(tgt, cfg)(), base)


def gpt_pair():
    torch.manual_seed(0)
    return transformers.GPT2Model(gpt2_cfg()), GPT(), gpt_truth


CORPUS = [
    Pair("BertModel -> BertForMaskedLM", "BERT", variant("BertModel", "BertForMaskedLM", bert_cfg, "bert")),
    Pair("BertModel -> BertForPreTraining", "BERT", variant("BertModel", "BertForPreTraining", bert_cfg, "bert")),
    Pair("BertModel -> BertForSequenceClassification", "BERT",
         variant("BertModel", "BertForSequenceClassification", bert_cfg, "bert")),
    Pair("BertForMaskedLM -> BertModel", "BERT", variant("BertForMaskedLM", "BertModel", bert_cfg, "bert")),
    Pair("BertModel -> renamed BERT", "BERT", lambda: by_rename(hf("BertModel", bert_cfg), BERT_RULES), renamed=True),
    Pair("BertModel -> renamed BERT (file from weightsmith.save)", "BERT",
         lambda: by_rename(hf("BertModel", bert_cfg), BERT_RULES), file="weightsmith", renamed=True),
    Pair("BertModel -> renamed BERT (file sorted by name)", "BERT",
         lambda: by_rename(hf("BertModel", bert_cfg), BERT_RULES), file="sorted"),
    Pair("RobertaModel -> RobertaForMaskedLM", "RoBERTa",
         variant("RobertaModel", "RobertaForMaskedLM", roberta_cfg, "roberta")),
    Pair("RobertaModel -> RobertaForSequenceClassification", "RoBERTa",
         variant("RobertaModel", "RobertaForSequenceClassification", roberta_cfg, "roberta")),
    Pair("RobertaModel -> renamed RoBERTa", "RoBERTa", lambda: by_rename(hf("RobertaModel", roberta_cfg), BERT_RULES),
         renamed=True),
    Pair("DistilBertModel -> DistilBertForMaskedLM", "DistilBERT",
         variant("DistilBertModel", "DistilBertForMaskedLM", distil_cfg, "distilbert")),
    Pair("DistilBertModel -> DistilBertForSequenceClassification", "DistilBERT",
         variant("DistilBertModel", "DistilBertForSequenceClassification", distil_cfg, "distilbert")),
    Pair("DistilBertModel -> renamed DistilBERT", "DistilBERT",
         lambda: by_rename(hf("DistilBertModel", distil_cfg), DISTIL_RULES), renamed=True),
    Pair("ElectraModel -> ElectraForPreTraining", "ELECTRA",
         variant("ElectraModel", "ElectraForPreTraining", electra_cfg, "electra")),
    Pair("ElectraModel -> ElectraForSequenceClassification", "ELECTRA",
         variant("ElectraModel", "ElectraForSequenceClassification", electra_cfg, "electra")),
    Pair("ElectraModel -> renamed ELECTRA", "ELECTRA",
         lambda: by_rename(hf("ElectraModel", electra_cfg), BERT_RULES + [(r"^embeddings_project$", "embed.project")]),
         renamed=True),
    Pair("GPT2Model -> GPT2LMHeadModel", "GPT-2", variant("GPT2Model", "GPT2LMHeadModel", gpt2_cfg, "transformer")),
    Pair("GPT2LMHeadModel -> GPT2Model", "GPT-2", variant("GPT2LMHeadModel", "GPT2Model", gpt2_cfg, "transformer")),
    Pair("GPT2Model (Conv1D) -> GPT of nn.Linear", "GPT-2", gpt_pair, renamed=True),
    Pair("T5EncoderModel -> T5ForConditionalGeneration", "T5",
         lambda: by_prefix(hf("T5EncoderModel", t5_cfg)(), hf("T5ForConditionalGeneration", t5_cfg)(), "")),
    Pair("T5EncoderModel -> renamed T5 encoder", "T5", lambda: by_rename(hf("T5EncoderModel", t5_cfg), T5_RULES),
         renamed=True),
    Pair("ViTModel -> ViTForImageClassification", "ViT",
         variant("ViTModel", "ViTForImageClassification", vit_cfg, "vit")),
    Pair("ViTModel -> renamed ViT", "ViT", lambda: by_rename(hf("ViTModel", vit_cfg), VIT_RULES), renamed=True),
    Pair("ViTModel -> ViT-style (norms reordered)", "ViT", hf_vit_into_timm_style, reordered=True),
    Pair("ResNet -> renamed ResNet", "ResNet-style", lambda: by_rename(ResNet, RESNET_RULES), renamed=True),
    Pair("ResNet -> renamed ResNet (file from weightsmith.save)", "ResNet-style",
         lambda: by_rename(ResNet, RESNET_RULES), file="weightsmith", renamed=True),
    Pair("ResNet -> renamed ResNet (file sorted by name)", "ResNet-style", lambda: by_rename(ResNet, RESNET_RULES),
         file="sorted"),
    Pair("ResNet -> ResNet with 5 classes", "ResNet-style",
         lambda: by_prefix(ResNet(10), ResNet(5), "")),
    Pair("ViT-style -> renamed ViT-style", "ViT-style", lambda: by_rename(TinyViT, TINYVIT_RULES), renamed=True),
    Pair("ViT-style -> ViT-style, 3 classes", "ViT-style", lambda: by_prefix(TinyViT(), TinyViT(classes=3), "")),
]


@dataclass
class Outcome:
    pair: Pair
    truth: int      # target tensors the truth pairs with a source tensor
    paired: int     # of those, paired by the plan (rightly)
    wrong: int      # pairings the truth disagrees with (source, or a transpose)
    ambiguous: int

    @property
    def coverage(self) -> float:
        return self.paired / self.truth if self.truth else 1.0


def run(pair: Pair, tmp_path) -> Outcome:
    source, target, truth = pair.make()
    state = source.state_dict()
    if pair.file:
        from safetensors.torch import save_file

        path = tmp_path / "source.safetensors"
        if pair.file == "weightsmith":
            ws.save(source, path)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        src = path
    else:
        src = state
    p = ws.plan(target, src, match="auto", on_mismatch="skip")
    tied = {s.target for s in p.steps if s.how == "tied"}
    expected = {t: truth(t) for t in target.state_dict() if t not in tied}
    got = {s.target: s for s in p.steps if s.loaded}
    wrong = paired = 0
    for t, (want, flip) in expected.items():
        step = got.get(t)
        if step is None:
            continue
        same = want is not None and len(step.sources) == 1 and (
            step.sources[0] == want or state[step.sources[0]].data_ptr() == state[want].data_ptr())  # tied names
        ok = same and (("transpose" in step.transforms) == flip)
        paired += ok
        wrong += not ok
    if paired:  # the load does what the plan says: each pairing's value, transposed where it says so
        ws.load_(target, src, plan=p, strict=False, min_coverage=0.0)
        now = target.state_dict()
        for t, (want, flip) in expected.items():
            if t in got and want is not None and t not in tied:
                value = state[got[t].sources[0]]
                assert torch.equal(now[t], value.T if flip else value), t
    return Outcome(pair, sum(1 for w, _ in expected.values() if w is not None), paired, wrong, len(p.ambiguous))


@functools.cache
def _outcomes(tmp) -> list[Outcome]:
    from pathlib import Path

    out = []
    for i, pair in enumerate(CORPUS):
        d = Path(tmp) / str(i)
        d.mkdir()
        out.append(run(pair, d))
    return out


def table(outcomes: list[Outcome]) -> str:
    rows = ["| pair | family | tensors to pair | paired | wrong | coverage |", "| --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        rows.append(f"| {o.pair.name} | {o.pair.family} | {o.truth} | {o.paired} | {o.wrong} | "
                    f"{_share(o.coverage)} |")
    total = sum(o.truth for o in outcomes)
    paired = sum(o.paired for o in outcomes)
    wrong = sum(o.wrong for o in outcomes)
    rows.append(f"| **all {len(outcomes)} pairs** | {len({o.pair.family for o in outcomes})} families | {total} | "
                f"{paired} | {wrong} | {_share(paired / total)} |")
    return "\n".join(rows)


def _share(x: float) -> str:
    from weightsmith.warmstart.plan import format_share

    return format_share(x)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[Outcome]:
    return _outcomes(str(tmp_path_factory.mktemp("corpus")))


def test_the_corpus_is_broad():
    assert len(CORPUS) >= 20
    assert len({p.family for p in CORPUS}) >= 8


def test_no_pair_in_the_corpus_is_paired_wrongly(outcomes):
    print("\n" + table(outcomes))
    assert [(o.pair.name, o.wrong) for o in outcomes if o.wrong] == []


def test_renamed_architectures_are_matched_nearly_whole(outcomes):
    low = [(o.pair.name, round(o.coverage, 3)) for o in outcomes if o.pair.renamed and o.coverage < 0.95]
    assert low == []


def test_task_variants_are_matched_whole(outcomes):
    # a base model and its task head share every name up to the prefix: all of the truth is paired
    partial = [(o.pair.name, o.paired, o.truth) for o in outcomes
               if not (o.pair.renamed or o.pair.file or o.pair.reordered) and o.paired != o.truth]
    assert partial == []


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(table(_outcomes(d)))
