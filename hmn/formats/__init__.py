"""Readers of the original text formats (Freebase dumps, SimpleQuestions, names, embeddings),
vectorised with ``pyarrow.compute``, one module per concern:

* :mod:`hmn.formats.keys`: Freebase key normalisation (every spelling -> ``/m/0abc``);
* :mod:`hmn.formats.lines`: plain or compressed files as lines, byte ranges of whole lines;
* :mod:`hmn.formats.parsed`: what a parser returns (accepted rows + one reject row per bad line)
  and the checks the parsers share;
* :mod:`hmn.formats.grouped`: grouped facts (FB2M / FB5M / SimpleQuestions ``kb.txt``) and plain
  triples (FB15k-237); :mod:`hmn.formats.coded`: their fast path, chunk-local dense ids;
* :mod:`hmn.formats.rdf`: the Freebase RDF dump (N-Triples);
* :mod:`hmn.formats.questions`, :mod:`hmn.formats.names`: SimpleQuestions questions, entity names;
* :mod:`hmn.formats.embedding_text`: embeddings in text form;
* :mod:`hmn.formats.registry`: the formats by kind of source, their parsers, detection
  (names only, import-free: :mod:`hmn.formats.choices`).
"""
