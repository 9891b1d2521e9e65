"""Adversarial attacks for robust DP training and robust evaluation, in [0, 1] pixel space.

    attacks.pgd          PGD (L-inf, L2; random start, restarts) and FGSM-RS
    attacks.isolation    attack a model in training without touching its gradients or per-sample state
    attacks.adversarial  adversarial training batches (--robust, --adv-ratio)
    attacks.robust_eval  robust accuracy and the gradient-masking checks
    attacks.defaults     names and default step sizes (no torch import, for the flag parser)
"""
