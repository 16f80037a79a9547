"""Benchmark corpus for issue 10: architectures written here as torch modules with random weights (speed only),
at realistic small sizes, exported with both torch exporters (TorchScript-based ``dynamo=False`` and
``dynamo=True``). Exporter output is kept as it comes (BatchNormalization nodes, Constant-node weights, shape
subgraphs, decomposed LayerNorm/GELU at older opsets); the models are in eval mode.

Each builder returns ``(module, example_inputs: tuple, input_names, batch_dynamic)``.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def _init(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def cbn(cin, cout, k=3, s=1, groups=1, act=None):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ---- MobileNetV3-small (HardSwish, SE with HardSigmoid) -------------------------------------------------
class SE(nn.Module):
    def __init__(self, c, r=4, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        m = max(8, c // r)
        self.fc1, self.act, self.fc2, self.gate = nn.Conv2d(c, m, 1), act(), nn.Conv2d(m, c, 1), gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class MBV3Block(nn.Module):
    def __init__(self, cin, k, exp, cout, se, act, s):
        super().__init__()
        self.res = s == 1 and cin == cout
        layers = []
        if exp != cin:
            layers.append(cbn(cin, exp, 1, act=act))
        layers.append(cbn(exp, exp, k, s, groups=exp, act=act))
        if se:
            layers.append(SE(exp))
        layers.append(cbn(exp, cout, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        y = self.body(x)
        return x + y if self.res else y


def mobilenetv3_small(width=1.0, classes=1000, last=1024):
    HS, RE = nn.Hardswish, nn.ReLU
    cfg = [(3, 16, 16, True, RE, 2), (3, 72, 24, False, RE, 2), (3, 88, 24, False, RE, 1),
           (5, 96, 40, True, HS, 2), (5, 240, 40, True, HS, 1), (5, 240, 40, True, HS, 1),
           (5, 120, 48, True, HS, 1), (5, 144, 48, True, HS, 1), (5, 288, 96, True, HS, 2),
           (5, 576, 96, True, HS, 1), (5, 576, 96, True, HS, 1)]

    def w(c):
        return max(8, int(c * width + 4) // 8 * 8)
    layers, cin = [cbn(3, w(16), 3, 2, act=HS)], w(16)
    for k, e, c, se, act, s in cfg:
        layers.append(MBV3Block(cin, k, w(e), w(c), se, act, s))
        cin = w(c)
    layers += [cbn(cin, w(576), 1, act=HS), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(w(576), last), nn.Hardswish(), nn.Linear(last, classes)]
    return nn.Sequential(*layers)


# ---- EfficientNet-B0-class (SiLU, SE with Sigmoid) ------------------------------------------------------
class MBConv(nn.Module):
    def __init__(self, cin, cout, k, s, t):
        super().__init__()
        mid = cin * t
        self.res = s == 1 and cin == cout
        layers = [] if t == 1 else [cbn(cin, mid, 1, act=nn.SiLU)]
        layers += [cbn(mid, mid, k, s, groups=mid, act=nn.SiLU), SE(mid, r=4 * t, act=nn.SiLU, gate=nn.Sigmoid),
                   cbn(mid, cout, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        y = self.body(x)
        return x + y if self.res else y


def efficientnet_b0(classes=1000):
    cfg = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
           (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]
    layers, cin = [cbn(3, 32, 3, 2, act=nn.SiLU)], 32
    for t, c, n, s, k in cfg:
        for i in range(n):
            layers.append(MBConv(cin, c, k, s if i == 0 else 1, t))
            cin = c
    layers += [cbn(cin, 1280, 1, act=nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, classes)]
    return nn.Sequential(*layers)


# ---- ResNet-50-class (bottlenecks, fewer blocks) --------------------------------------------------------
class Bottleneck(nn.Module):
    def __init__(self, cin, mid, s):
        super().__init__()
        cout = mid * 4
        self.body = nn.Sequential(cbn(cin, mid, 1, act=nn.ReLU), cbn(mid, mid, 3, s, act=nn.ReLU), cbn(mid, cout, 1))
        self.sc = None if s == 1 and cin == cout else cbn(cin, cout, 1, s)

    def forward(self, x):
        return torch.relu(self.body(x) + (x if self.sc is None else self.sc(x)))


def resnet50_class(blocks=(2, 3, 3, 2), classes=1000):
    layers = [cbn(3, 64, 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, (n, w) in enumerate(zip(blocks, (64, 128, 256, 512))):
        for j in range(n):
            layers.append(Bottleneck(cin, w, 2 if j == 0 and i > 0 else 1))
            cin = w * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


# ---- transformer encoder (ViT and BERT classes; attention written out as the HF models do) ---------------
class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mask=None):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(B, T, self.h, self.dh).transpose(1, 2)
        v = self.v(x).view(B, T, self.h, self.dh).transpose(1, 2)
        a = (q @ k.transpose(-1, -2)) / math.sqrt(self.dh)
        if mask is not None:
            a = a + mask
        a = a.softmax(-1)
        return self.o((a @ v).transpose(1, 2).reshape(B, T, D))


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, ff, pre=True, gelu="none"):
        super().__init__()
        self.pre = pre
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = Attention(d, heads)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(approximate=gelu), nn.Linear(ff, d))

    def forward(self, x, mask=None):
        if self.pre:  # ViT
            x = x + self.att(self.ln1(x), mask)
            return x + self.ff(self.ln2(x))
        x = self.ln1(x + self.att(x, mask))  # BERT (post-LN)
        return self.ln2(x + self.ff(x))


class ViT(nn.Module):
    def __init__(self, img=128, patch=16, d=192, depth=6, heads=3, classes=1000):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        n = (img // patch) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, 4 * d) for _ in range(depth))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln(x[:, 0]))


class BertClass(nn.Module):
    """BERT-class text classifier fed ``inputs_embeds`` (B, T, d) and an attention mask (float input)."""

    def __init__(self, T=128, d=256, depth=4, heads=4, classes=2):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, T, d) * 0.02)
        self.ln = nn.LayerNorm(d)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, 4 * d, pre=False, gelu="tanh") for _ in range(depth))
        self.pool = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, emb, mask):
        x = self.ln(emb + self.pos)
        m = (1.0 - mask[:, None, None, :]) * -10000.0
        for layer in self.layers:
            x = layer(x, m)
        return self.head(torch.tanh(self.pool(x[:, 0])))


# ---- YOLOv8n-class detector (SiLU, C2f with Split/Concat, SPPF, Resize upsample) -------------------------
def cbs(cin, cout, k=1, s=1):
    return cbn(cin, cout, k, s, act=nn.SiLU)


class C2f(nn.Module):
    def __init__(self, cin, cout, n=1, shortcut=True):
        super().__init__()
        self.c = cout // 2
        self.cv1, self.cv2 = cbs(cin, 2 * self.c), cbs((2 + n) * self.c, cout)
        self.m = nn.ModuleList(nn.Sequential(cbs(self.c, self.c, 3), cbs(self.c, self.c, 3)) for _ in range(n))
        self.shortcut = shortcut

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]) if self.shortcut else m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.cv1, self.cv2 = cbs(cin, cin // 2), cbs(cin * 2, cout)
        self.mp = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.mp(x); y2 = self.mp(y1)
        return self.cv2(torch.cat([x, y1, y2, self.mp(y2)], 1))


class YoloN(nn.Module):
    def __init__(self, nc=80):
        super().__init__()
        self.b1 = nn.Sequential(cbs(3, 16, 3, 2), cbs(16, 32, 3, 2), C2f(32, 32), cbs(32, 64, 3, 2), C2f(64, 64, 2))
        self.b2 = nn.Sequential(cbs(64, 128, 3, 2), C2f(128, 128, 2))
        self.b3 = nn.Sequential(cbs(128, 256, 3, 2), C2f(256, 256), SPPF(256, 256))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h1, self.h2 = C2f(384, 128, shortcut=False), C2f(192, 64, shortcut=False)
        self.d1, self.h3 = cbs(64, 64, 3, 2), C2f(192, 128, shortcut=False)
        self.d2, self.h4 = cbs(128, 128, 3, 2), C2f(384, 256, shortcut=False)
        self.heads = nn.ModuleList(nn.Sequential(cbs(c, 64, 3), cbs(64, 64, 3), nn.Conv2d(64, 4 + nc, 1))
                                   for c in (64, 128, 256))

    def forward(self, x):
        p3 = self.b1(x); p4 = self.b2(p3); p5 = self.b3(p4)
        t4 = self.h1(torch.cat([self.up(p5), p4], 1))
        o3 = self.h2(torch.cat([self.up(t4), p3], 1))
        o4 = self.h3(torch.cat([self.d1(o3), t4], 1))
        o5 = self.h4(torch.cat([self.d2(o4), p5], 1))
        outs = [h(o).flatten(2) for h, o in zip(self.heads, (o3, o4, o5))]
        y = torch.cat(outs, 2)
        return torch.cat([y[:, :4], y[:, 4:].sigmoid()], 1)  # (B, 84, anchors)


# ---- CRNN (conv + BiLSTM) text recogniser, 48x320 ------------------------------------------------------
class CRNN(nn.Module):
    def __init__(self, classes=97, hidden=128):
        super().__init__()
        self.cnn = nn.Sequential(cbn(3, 32, 3, act=nn.ReLU), nn.MaxPool2d(2), cbn(32, 64, 3, act=nn.ReLU),
                                 nn.MaxPool2d(2), cbn(64, 128, 3, act=nn.ReLU), cbn(128, 128, 3, act=nn.ReLU),
                                 nn.MaxPool2d((2, 1)), cbn(128, 192, 3, act=nn.ReLU), nn.MaxPool2d((2, 1)),
                                 cbn(192, 192, 3, act=nn.ReLU), nn.MaxPool2d((3, 2)))
        self.rnn = nn.LSTM(192, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        f = self.cnn(x).squeeze(2).transpose(1, 2)  # (B, 40, 192)
        y, _ = self.rnn(f)
        return self.fc(y).log_softmax(-1)


# ---- tiny classifier (~500 nodes, overhead-bound), PaddleOCR-cls-like at 48x192 -------------------------
class HSwishDecomposed(nn.Module):
    def forward(self, x):  # as paddle2onnx-class graphs write it
        return x * F.relu6(x + 3.0) / 6.0


class TinyBlock(nn.Module):
    def __init__(self, cin, cout, s):
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(cin, cin, 3, s, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                HSwishDecomposed())
        self.se_fc1, self.se_fc2 = nn.Conv2d(cin, max(4, cin // 4), 1), nn.Conv2d(max(4, cin // 4), cin, 1)
        self.pw = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), HSwishDecomposed())

    def forward(self, x):
        y = self.dw(x)
        s = y.mean((2, 3), keepdim=True)
        s = F.relu6(self.se_fc2(F.relu(self.se_fc1(s))) + 3.0) / 6.0
        return self.pw(y * s)


def tiny_classifier(classes=2):
    chans = [16, 16, 32, 32, 32, 48, 48, 48, 64, 64, 64, 96, 96, 96, 128, 128, 128, 192, 192, 192]
    strides = [1, 2, 1, 1, 2, 1, 1, (2, 1), 1, 1, 1, (2, 1), 1, 1, 1, 1, 1, (2, 1), 1, 1]
    layers, cin = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), HSwishDecomposed()], 16
    for c, s in zip(chans, strides):
        layers.append(TinyBlock(cin, c, s))
        cin = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes), nn.Softmax(-1)]
    return nn.Sequential(*layers)


# ---- conv + GRU speech model (mel features -> frame logits) ---------------------------------------------
class SpeechGRU(nn.Module):
    def __init__(self, mels=80, classes=32, hidden=192):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(mels, 192, 5, 2, 2), nn.BatchNorm1d(192), nn.ReLU(),
                                  nn.Conv1d(192, 192, 5, 1, 2), nn.BatchNorm1d(192), nn.ReLU())
        self.gru = nn.GRU(192, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x):  # x (B, 80, 200) log-mel
        h = self.conv(x).transpose(1, 2)
        y, _ = self.gru(h)
        return self.fc(y)


# ---- the corpus -----------------------------------------------------------------------------------------
def _img(c, h, w):
    return (torch.randn(1, c, h, w),)


BUILDERS = {
    # name: (family, builder, example inputs, input names, opset for the TorchScript exporter)
    "mobilenetv3s": ("MobileNetV3-small (HardSwish, SE), 160²", lambda: mobilenetv3_small(), _img(3, 160, 160),
                     ["x"], 17),
    "efficientnetb0": ("EfficientNet-B0 (SiLU, SE), 160²", efficientnet_b0, _img(3, 160, 160), ["x"], 17),
    "resnet50c": ("ResNet-50-class (2-3-3-2 bottlenecks), 160²", resnet50_class, _img(3, 160, 160), ["x"], 17),
    "vit": ("ViT-tiny-class (pre-LN, erf GELU), 128², 65 tokens", ViT, _img(3, 128, 128), ["x"], 17),
    "bert": ("BERT-class (post-LN, tanh GELU, mask), seq 128", BertClass,
             (torch.randn(1, 128, 256), torch.ones(1, 128)), ["emb", "mask"], 14),
    "yolo": ("YOLOv8n-class (SiLU, C2f, SPPF, Resize), 320²", YoloN, _img(3, 320, 320), ["x"], 17),
    "crnn": ("CRNN (conv + 2-layer BiLSTM), 48x320", CRNN, _img(3, 48, 320), ["x"], 17),
    "tiny": ("tiny classifier (PaddleOCR-cls-like: 20 dw blocks, SE, decomposed HardSwish), 48x192", tiny_classifier,
             _img(3, 48, 192), ["x"], 11),
    "speechgru": ("speech conv1d + 2-layer BiGRU, 80 mels x 200 frames", SpeechGRU, (torch.randn(1, 80, 200),),
                  ["x"], 17),
}


def export(name: str, exporter: str, out_dir: str) -> tuple[str, bool, str]:
    """Export corpus model ``name`` with ``exporter`` ('ts' or 'dynamo') to ``out_dir`` (cached).
    Returns (path, batch_dynamic, note)."""
    import warnings
    family, build, example, names, opset = BUILDERS[name]
    path = os.path.join(out_dir, f"{name}.{exporter}.onnx")
    flag = path + ".fixedbatch"
    if os.path.exists(path):
        return path, not os.path.exists(flag), ""
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    m = _init(build())
    note = ""
    dynamic = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "ts":
            torch.onnx.export(m, example, path, input_names=names, output_names=["y"], dynamo=False,
                              opset_version=opset, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.PRESERVE,
                              dynamic_axes={n: {0: "batch"} for n in names + ["y"]})
        else:
            try:
                B = torch.export.Dim("batch", min=1, max=1024)
                prog = torch.onnx.export(m, example, input_names=names, output_names=["y"], dynamo=True,
                                         dynamic_shapes=tuple({0: B} for _ in names), verbose=False)
            except Exception as e:  # noqa: BLE001 -- fall back to a fixed batch
                note = f"dynamic batch failed ({type(e).__name__}); fixed batch 1"
                dynamic = False
                prog = torch.onnx.export(m, example, input_names=names, output_names=["y"], dynamo=True,
                                         verbose=False)
            prog.save(path)
    if not dynamic:
        open(flag, "w").write(note)
    return path, dynamic, note
