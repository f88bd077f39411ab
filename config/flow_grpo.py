# Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) on the built-in flow toy model: ddpo with the SDE form of the flow
# step (noise level 0.7), group advantages over the round's reward std (global_std), PPO's ratio clip 1e-4 and the
# KL to the base model (beta 0.04), as its official config; "denoising reduction": 10 sampler steps in training
# (eval.py samples 20), 9 of them trained per step. Its lr is config/grpo.py's (chosen on the DDIM model's train
# prompts), as the flow model's other configs take the DDIM model's settings.
#   python train.py config/flow_grpo.py [--nfe_budget=184320]
import os
model = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "assets", "toy-flow-model"))
method = "ddpo"
out_dir = "out/flow_grpo"
ddpo_eta = 0.7           # its noise_level a: the SDE's g = a sqrt(sigma / (1 - sigma))
ddpo_std = "step"
ddpo_kl = 0.04
ppo_clip = 1e-4
n_traj = 8               # images per prompt (official: 24)
prompts_per_step = 16
num_steps = 10
timestep_fraction = 0.99
lr = 1e-3                # config/grpo.py's
