"""Adversarial attacks (PGD, FGSM with random start) in [0, 1] pixel space: arrive with the attacks issue."""
