# Diffusion-Sharpening, SFT variant (Alg. 1), on the built-in toy model.
#   python train.py config/sharpen_sft.py
# Chosen on train prompts (docs/notes.md, 2026-11-25): rolled steps m > 1 lower the reward here;
# lr 1e-4 / 3e-4 / 1e-3 gave 0.565 / 0.611 / 0.599 train gold at 240 steps.
method = "sharpen_sft"
m_steps = 1
prompts_per_step = 64
lr = 3e-4
steps = 480
start_range = ""
