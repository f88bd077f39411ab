# RAFT as Dong et al. (arXiv 2304.06767) run it: rounds of a pool sampled by the current model, the best of 4
# per prompt, a few passes over each pool, and pretraining scenes replayed in every step as the anchor against
# training on its own samples. The settings were chosen on train prompts (docs/notes.md, 2026-12-03).
#   python train.py config/raft_rounds.py [--nfe_budget=184320]
#   python train.py config/raft_rounds.py --raft_select=first    # the same pools without selection: the control
method = "raft"
raft_pool = 64           # train prompts per round
raft_n = 4               # candidates per prompt
raft_epochs = 4          # passes over each pool: a round serves 8 steps
prompts_per_step = 32
replay = 16              # pretraining scenes per step (alt-text captions): without them lr 1e-4 loses 0.083 train gold
lr = 3e-4                # with the replay: 3e-5 -0.002, 1e-4 +0.009, 3e-4 +0.029, 1e-3 +0.012 (train prompts)
