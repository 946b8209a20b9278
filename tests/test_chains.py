"""Entity-linked passage chains: a passage naming another retrieved passage's entity is read with it."""
import pytest

from hybrid_kernels.retrieval.chains import link_passages, mark_asked_entities, prepare_for_reader


def test_bridge_passage_is_appended_to_the_passage_naming_it():
    ps = [("bodu", "bodu was born in kenia ."), ("bodu", "bodu has a cat ."),
          ("kenia", "the capital of kenia is lima ."), ("sato", "sato was born in peria .")]
    out = link_passages(ps)
    assert len(out) == len(ps) and [t for t, _ in out] == [t for t, _ in ps]
    assert out[0] == ("bodu", "bodu was born in kenia . the capital of kenia is lima .")
    # same entity (title) is not a link; a passage without a named entity in the set is unchanged
    assert out[1] == ps[1] and out[3] == ps[3]
    assert out[2] == ps[2]                       # its own title is not a link


def test_question_aware_linking_only_where_the_chain_answers_the_rest():
    ps = [("bodu", "bodu was born in kenia ."), ("kenia", "the capital of kenia is lima .")]
    two_hop = link_passages(ps, question="what is the capital of the country where bodu was born ?")
    assert two_hop[0][1] == "bodu was born in kenia . the capital of kenia is lima ."
    assert link_passages(ps, question="where was bodu born ?") == ps
    with pytest.raises(TypeError, match="question"):
        link_passages(ps, question=3)


def test_link_limit_and_rank_order():
    ps = [("a", "a knows b and c ."), ("b", "b is tall ."), ("c", "c is short .")]
    assert link_passages(ps)[0][1] == "a knows b and c . b is tall ."
    assert link_passages(ps, max_links=2)[0][1] == "a knows b and c . b is tall . c is short ."
    assert link_passages(ps, max_links=0) == ps
    assert link_passages([]) == []


def test_link_passages_input_errors():
    with pytest.raises(ValueError, match="max_links"):
        link_passages([("a", "b")], max_links=-1)
    with pytest.raises(TypeError, match=r"passages\[0\]"):
        link_passages(["just text"])


def test_pipeline_reads_linked_passages():
    from hybrid_kernels.rag import HybridRAGPipeline
    from hybrid_kernels.training import EntityQATask

    class _Embedder:
        dim = 4

        def __call__(self, texts):
            import numpy as np
            return np.ones((len(texts), 4), dtype="float32")

    tok = EntityQATask(num_people=4, num_countries=2).tokenizer
    ps = [{"title": "bodu", "text": "bodu was born in kenia ."},
          {"title": "kenia", "text": "the capital of kenia is lima ."}]
    plain = HybridRAGPipeline(None, tok, embedder=_Embedder())
    linked = HybridRAGPipeline(None, tok, embedder=_Embedder(), prepare_passages=prepare_for_reader)
    q = "what is the capital of the country where bodu was born ?"
    ids_plain, _ = plain._inputs([q], [ps])
    ids_linked, mask_linked = linked._inputs([q], [ps])
    assert ids_linked.shape[:2] == ids_plain.shape[:2] == (1, 2)
    first = tok.decode(ids_linked[0, 0][mask_linked[0, 0]].tolist())
    assert "capital" in first and "lima" in first and "match:" in first
    assert "capital" not in tok.decode(ids_plain[0, 0].tolist()).split("context:")[1]
    with pytest.raises(TypeError, match="prepare_passages"):
        HybridRAGPipeline(None, tok, embedder=_Embedder(), prepare_passages="yes")


def test_mark_asked_entities():
    ps = [("bodu", "bodu has a cat ."), ("sato", "sato has a dog ."), ("", "untitled .")]
    out = mark_asked_entities("what pet does bodu have ?", ps)
    assert out == [("match: bodu", "bodu has a cat ."), ("sato", "sato has a dog ."), ("", "untitled .")]
    both = prepare_for_reader("what is the capital of the country where bodu was born ?",
                              [("bodu", "bodu was born in kenia ."), ("kenia", "the capital of kenia is lima .")])
    assert both[0] == ("match: bodu", "bodu was born in kenia . the capital of kenia is lima .")
    assert both[1] == ("kenia", "the capital of kenia is lima .")
    with pytest.raises(TypeError, match="question"):
        mark_asked_entities(None, ps)
    with pytest.raises(TypeError, match=r"passages\[0\]"):
        mark_asked_entities("q", ["text"])
