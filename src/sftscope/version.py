"""sftscope's version, in a module of its own so that modules record it without importing the
package's ``__init__`` (which exposes the Python API lazily: ``sftscope.api``)."""

__version__ = "0.1.0"
