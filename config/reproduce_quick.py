# dev/reproduce.py --quick: tiny settings after config/reproduce.py, to check the pipeline in minutes
# (the numbers mean nothing). The stage flags come after and win (eval_seeds of the curves, for one).
prompts_per_step = 2
num_steps = 4
threads = 1
dpo_pool = 4
eval_seeds = 1
probe_pairs = 0
