"""A model that repeats blocks (GPT-2's h.N, BERT's encoder.layer.N, Llama's layers.N, a ResNet's
blocks across its stages) is diagnosed through its blocks: each block's ||dL/dz|| is the
root-sum-square over its layers', checked against autograd on a copy, and the verdict's ratio is the
first block's over the last's, with the head left out. Models built from tiny configs, default layers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradexp
from gradexp.probes.hooks import candidate_layers, find_blocks


def reference_dz(model: nn.Module, names: list[str], forward) -> dict[str, float]:
    """||dL/dz|| of each named layer's output by autograd (tensor hooks on a copy), summed over calls."""
    sq: dict[str, float] = {n: 0.0 for n in names}
    modules = dict(model.named_modules())

    def hook(name):
        def on_output(_, __, out):
            out.register_hook(lambda g: sq.__setitem__(name, sq[name] + g.double().pow(2).sum().item()))
        return on_output

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    forward(model).backward()
    for h in handles:
        h.remove()
    return {n: math.sqrt(v) for n, v in sq.items()}


def watch_one_step(model: nn.Module, forward, tmp_path) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradexp.watch(model, opt, logdir=tmp_path / "w", every=1) as w:
        forward(model).backward()
        opt.step()
    return w.summary()


def hugging_face(kind: str):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    ids = torch.randint(0, 64, (4, 16))
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return (transformers.GPT2LMHeadModel(config), lambda m: m(input_ids=ids, labels=ids).loss,
                "transformer.h", "lm_head")
    if kind == "bert":
        config = transformers.BertConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=64, max_position_embeddings=32,
                                         num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        labels = torch.randint(0, 3, (4,))
        return (transformers.BertForSequenceClassification(config),
                lambda m: m(input_ids=ids, labels=labels).loss, "bert.encoder.layer", "classifier")
    config = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64, vocab_size=64,
                                      max_position_embeddings=32)
    return (transformers.LlamaForCausalLM(config), lambda m: m(input_ids=ids, labels=ids).loss,
            "model.layers", "lm_head")


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_a_hugging_face_model_is_diagnosed_through_its_blocks_with_its_head_left_out(kind, tmp_path):
    torch.manual_seed(0)
    model, forward, stack, head = hugging_face(kind)
    ref = copy.deepcopy(model)
    summary = watch_one_step(model, forward, tmp_path)
    info, d = summary["layers"], summary["diagnosis"]
    assert info["modules"][-1] == head and info["output"][-1] and not any(info["output"][:-1])
    assert [b["name"] for b in info["blocks"]] == [f"{stack}.{k}" for k in range(3)]
    dz = reference_dz(ref, info["modules"], forward)
    expected = [math.sqrt(sum(dz[info["modules"][i]] ** 2 for i in b["layers"])) for b in info["blocks"]]
    assert all(info["modules"][i].startswith(b["name"] + ".") for b in info["blocks"] for i in b["layers"])
    assert d["depth_axis"] == "blocks"
    assert d["blocks"]["act_grad_norm"]["first"] == pytest.approx(expected, rel=1e-4)
    assert d["ratio"] == pytest.approx(expected[0] / expected[-1], rel=1e-4)
    assert d["verdict"] == "healthy"
    assert d["message"].startswith(f"healthy: at step 0 block {stack}.0's back-propagated gradient ||dL/dz|| "
                                   f"(root-sum-square over its layers) is ")
    assert f"block {stack}.2's" in d["message"] and head not in d["message"]
    assert (tmp_path / "w" / "gradient_flow.png").stat().st_size > 0


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, residual: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.residual = residual
        self.down = None if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            out = out + (x if self.down is None else self.down(x))
        return F.relu(out)


class ResNet(nn.Module):
    """A small ResNet: a stem, three stages of two blocks each (widths 8, 16, 32), a linear head."""

    def __init__(self, residual: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8, residual=residual), BasicBlock(8, 8, residual=residual))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, residual), BasicBlock(16, 16, residual=residual))
        self.layer3 = nn.Sequential(BasicBlock(16, 32, 2, residual), BasicBlock(32, 32, residual=residual))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_a_resnet_is_diagnosed_through_its_blocks_across_stages_and_is_healthy(tmp_path):
    torch.manual_seed(0)
    model = ResNet()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    summary = watch_one_step(model, lambda m: F.cross_entropy(m(x), y), tmp_path)
    blocks = summary["layers"]["blocks"]
    assert [b["name"] for b in blocks] == [f"layer{s}.{k}" for s in (1, 2, 3) for k in (0, 1)]
    assert [len(b["layers"]) for b in blocks] == [2, 2, 3, 2, 3, 2]  # a stage's first block has its downsample
    d = summary["diagnosis"]
    assert d["verdict"] == "healthy" and d["depth_axis"] == "blocks"
    assert "block layer1.0's" in d["message"] and "block layer3.1's" in d["message"]


def test_blocks_are_only_modules_that_repeat_and_hold_layers():
    """torch's own containers are blocks only where they hold the same modules of the same shapes; a
    model whose blocks hold one layer each keeps the layers as its depth axis."""
    def blocks(model):
        return find_blocks(model, [n for n, _ in candidate_layers(model)])

    same = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)) for _ in range(3)))
    assert blocks(same) == [("0", [0, 1]), ("1", [2, 3]), ("2", [4, 5])]
    differ = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)), nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)))
    assert blocks(differ) == []
    one_layer_each = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(4)))
    assert blocks(one_layer_each) == []
    assert blocks(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))) == []


def test_a_plain_deep_net_without_residuals_vanishes_through_its_blocks(tmp_path):
    """Six identical blocks of two sigmoid layers, no shortcut, no normalisation: the gradient vanishes
    block by block, and the verdict's ratio and words are the blocks'."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid())
                            for _ in range(6)), nn.Linear(16, 3))
    x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
    ref = copy.deepcopy(model)
    summary = watch_one_step(model, lambda m: F.cross_entropy(m(x), y), tmp_path)
    d = summary["diagnosis"]
    info = summary["layers"]
    dz = reference_dz(ref, info["modules"], lambda m: F.cross_entropy(m(x), y))
    per_block = [math.hypot(*(dz[info["modules"][i]] for i in b["layers"])) for b in info["blocks"]]
    assert d["verdict"] == "vanishing" and d["ratio"] == pytest.approx(per_block[0] / per_block[-1], rel=1e-4)
    assert d["ratio"] < 1e-2 and "per block" in d["message"] and "block 0's" in d["message"]


def test_a_head_inside_the_last_block_is_left_out_of_its_value(tmp_path):
    """Three blocks of (Linear, Tanh, Linear), the model's output the last block's second Linear: that
    block's value is its hidden layer's alone, as the layers' ratio leaves the head out."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)) for _ in range(3)))
    x, y = torch.randn(16, 8), torch.randint(0, 8, (16,))
    ref = copy.deepcopy(model)
    summary = watch_one_step(model, lambda m: F.cross_entropy(m(x), y), tmp_path)
    info, d = summary["layers"], summary["diagnosis"]
    assert info["output"][-1] and info["blocks"][-1]["layers"][-1] == len(info["modules"]) - 1
    dz = reference_dz(ref, info["modules"], lambda m: F.cross_entropy(m(x), y))
    hidden = [[info["modules"][i] for i in b["layers"] if not info["output"][i]] for b in info["blocks"]]
    expected = [math.hypot(*(dz[n] for n in names)) for names in hidden]
    assert d["blocks"]["act_grad_norm"]["first"] == pytest.approx(expected, rel=1e-4)
    assert d["ratio"] == pytest.approx(expected[0] / expected[-1], rel=1e-4)


def test_parallel_heads_over_a_trunk_are_branches_not_depth(tmp_path):
    """Three task heads of two layers each, called on the trunk's one output: side by side, not one
    after another, so the depth axis stays the layers', with a trunk of four layers or of one."""
    class MultiTask(nn.Module):
        def __init__(self, trunk: int):
            super().__init__()
            self.trunk = nn.Sequential(*(m for _ in range(trunk) for m in (nn.Linear(8, 8), nn.ReLU())))
            self.heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(3))

        def forward(self, x):
            h = self.trunk(x)
            return torch.cat([head(h) for head in self.heads], dim=1)

    x, y = torch.randn(16, 8), torch.randint(0, 6, (16,))
    for trunk in (4, 1):
        model = MultiTask(trunk)
        names = [n for n, _ in candidate_layers(model)]
        assert [b for b, _ in find_blocks(model, names)] == ["heads.0", "heads.1", "heads.2"]  # by shape alone
        summary = watch_one_step(model, lambda m: F.cross_entropy(m(x), y), tmp_path / str(trunk))
        assert "blocks" not in summary["layers"] and summary["diagnosis"]["depth_axis"] == "layers"
