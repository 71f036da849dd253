"""Self-supervised training of image encoders: Barlow Twins, BYOL and SimSiam.

The package makes encoders; `embedserve` serves them. Nothing here is imported by the server.
"""
