# The train.py settings every run of dev/reproduce.py was made with (docs/reproduce.md): train.py's
# defaults until 2026-11-25. dev/reproduce.py passes this file first, then each stage's own flags.
#   python train.py config/reproduce.py --method=sharpen_sft --nfe_budget=25000
prompts_per_step = 8
lr = 1e-5
m_steps = 3
start_range = ""
dpo_target = "start"
