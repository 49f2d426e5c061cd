"""The dashboard's library side: Streamlit helpers (``ui``, the only module that imports
Streamlit), pure figure builders (``plots``, ``eval_plots``), the Launch form's checks
(``launch``) and the offline HTML report (``report``)."""
