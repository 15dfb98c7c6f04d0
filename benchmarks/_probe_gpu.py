import sys, traceback, torch
sys.path.insert(0, "tests"); sys.path.insert(0, "tests/gpu")
from test_cuda_graphs import render_setup, target_pose, W, H
model, state, K = render_setup("cuda")
views = model.predictor.nearest_views(state, target_pose(0.1))
c2w, Kd = target_pose(0.1).cuda(), K.cuda()
for _ in range(2):
    model._decode(state, views, c2w, Kd, W, H, reuse_graphs=True)
t = target_pose(0.3).cuda(); torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
try:
    model._decode(state, views, t, Kd, W, H, reuse_graphs=True)
except Exception:
    traceback.print_exc(limit=-6)
torch.cuda.set_sync_debug_mode("default")
import test_layered_gpu as L
(one, g1), (two, g2) = L._render(True), L._render(False)
(ref, _) = L._render(True, backend="reference")
for n in ("rgb", "depth", "alpha", "background"):
    a, b, r = getattr(one, n), getattr(two, n), getattr(ref, n)
    print(n, "one-two max %.2e mean %.2e" % ((a-b).abs().max(), (a-b).abs().mean()), "one-ref max %.2e" % (a-r).abs().max())
print("min T_fg", float((1-two.alpha).min()))
