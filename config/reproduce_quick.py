# dev/reproduce.py --quick: tiny settings for every train.py run, after the run's config files and before its
# flags, to check the pipeline in minutes (the numbers mean nothing; the stage flags win).
prompts_per_step = 2
num_steps = 4
threads = 1
dpo_pool = 4
raft_n = 2
eval_seeds = 1
probe_pairs = 0
