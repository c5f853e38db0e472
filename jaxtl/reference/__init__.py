"""Independent NumPy transcriptions of the equations jaxtl implements, and the checks that compare them.

``optimizers`` and ``schedules`` are written from the papers and from fastai's source, never from jaxtl's code,
and import nothing from jaxtl; ``checks`` runs jaxtl and the transcriptions side by side
(``scripts/check_formulas.py`` prints the table; docs/formulas.md lists the equations).
"""
