"""The dashboard's library side: Streamlit helpers (``ui``, the only module that imports
Streamlit), pure figure builders (``plots``, ``eval_plots``) and the offline HTML report."""
