# Flow-GRPO's recipe (Liu et al. 2025, arXiv 2505.05470) on the built-in DDIM model: ddpo (DDIM eta 1 sampler, its
# Gaussian log-density, PPO's ratio clip 1e-4) with group advantages over the round's reward std (global_std) and
# the KL to the base model (beta 0.04). On a DDIM model this is DDPO with group advantages and that KL; on the flow
# model config/flow_grpo.py is Flow-GRPO itself. The lr was chosen on train prompts at half the study's budget
# (docs/notes.md, 2026-12-06).
#   python train.py config/grpo.py [--nfe_budget=184320]
method = "ddpo"
out_dir = "out/grpo"
ddpo_std = "step"
ddpo_kl = 0.04
lr = 1e-3                # train prompts, half the budget: 1e-4 +0.053, 3e-4 +0.087, 1e-3 +0.143, 3e-3 collapses
