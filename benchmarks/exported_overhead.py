"""Exported-program interpreter vs the original module: VG and IG(50) on one batch of 250, interleaved
repeats, one thread (`.venv/bin/python benchmarks/exported_overhead.py`)."""
import statistics, tempfile, time, torch
from salbench import metrics
from salbench.model_zoo.architectures import build
from salbench.model_zoo.exported import load_exported
torch.manual_seed(0)
torch.set_num_threads(1)
net = build("lenet").eval()
d = tempfile.mkdtemp()
torch.export.save(torch.export.export(net, (torch.rand(2, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("b")},)), f"{d}/m.pt2")
exp = load_exported(f"{d}/m.pt2")
x = torch.rand(250, 1, 28, 28); y = net(x).argmax(1)
for name, fn in (("VG", metrics.vanilla_gradient), ("IG", metrics.integrated_gradients)):
    t = {"module": [], "exported": []}
    for _ in range(7):
        for label, m in (("module", net), ("exported", exp)):
            t0 = time.perf_counter(); fn(m, x, y); t[label].append(time.perf_counter() - t0)
    a, b = statistics.median(t["module"]), statistics.median(t["exported"])
    print(f"{name}: module {a*1000:.1f} ms, exported {b*1000:.1f} ms, ratio exported/module {b/a:.3f} (median of 7, batch 250, 1 thread)")
