"""popxl.Module: a class whose ``build`` method is traced into a graph by ``ir.create_graph``."""


class Module:
    """Subclass and define ``build(*args)``; ``ir.create_graph(module, *specs)`` traces it."""

    def build(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define build()")

    def __call__(self, *args, **kwargs):
        return self.build(*args, **kwargs)
