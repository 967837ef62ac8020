"""What users type: the command line (`cli`), the commands behind it (`commands`) and `compare`.
"""

__all__ = ['cli', 'commands', 'compare']
