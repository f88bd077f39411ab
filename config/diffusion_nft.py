# DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) on the built-in DDIM model: the old policy's ODE samples (DDIM
# eta 0), rewards normalised per prompt group into r in [0, 1], the implicit positive / negative policies in x0
# space; beta 1, decay_type 1 (nft_decay 0.001, up to 0.5), KL weight 1e-4, as its official config (docs/notes.md).
# The lr was chosen on train prompts at half the study's budget (docs/notes.md, 2026-12-06).
#   python train.py config/diffusion_nft.py [--nfe_budget=184320]
method = "diffusion_nft"
out_dir = "out/diffusion_nft"
lr = 1e-4                # train prompts, half the budget: 1e-4 +0.107, 3e-4 -0.066 (its reward falls after step 8)
