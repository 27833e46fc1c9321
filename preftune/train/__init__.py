"""The trainers, the step engine and the one loop; preftune/train/entry.py is the entry.

Nothing is imported here: `import preftune` imports this package (see preftune/__init__.py)
and should not pay for torch and transformers then. Import from the modules
(`from preftune.train.entry import train`).
"""
