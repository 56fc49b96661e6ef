"""Hierarchical Memory Networks core library (no Ray).

Notation used across the package (shapes in comments):
    N  facts in the memory          D  fact / query dimension (600 = 3 x 200)
    B  questions in a batch         K  candidates per question
    C  clusters                     V  vocabulary size
    E  entities                     R  relations
"""

__version__ = "0.1.0"
