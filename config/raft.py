# RAFT (best-of-N distillation) with its learning rate chosen on train prompts (docs/notes.md, 2026-12-01):
#   python train.py config/raft.py [--nfe_budget=184320]
# Trained on its own samples, the model loses fidelity as it goes (train-prompt gold at 40 steps, 128 images:
# lr 1e-4 0.659 -> 0.474, lr 1e-5 0.659 -> 0.641); the smaller rate harms least.
method = "raft"
lr = 1e-5
