"""Pictures of the dataflow: DOT text (always) and PNG (through matplotlib, when installed)."""

from __future__ import annotations

from pathlib import Path

from .ir import Program, dataflow_graph

_COLOURS = {"input": "#cfe8ff", "param": "#ffe7c2", "buffer": "#ffe7c2", "state": "#d9f7d1", "update": "#b7ecb0",
            "output": "#f6c7c7", "mask": "#e8d9ff", "sum": "#f2f2f2", "softmax": "#f2f2f2"}


def to_dot(p: Program) -> str:
    """The dataflow graph of ``p`` in Graphviz DOT (deterministic)."""
    g = dataflow_graph(p)
    lines = [f'digraph "{p.name}" {{', "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
    for vid, data in g.nodes(data=True):
        label = data.get("label", vid).replace("\\", "\\\\").replace('"', '\\"')
        if data.get("idx"):
            label += f"\\n[{data['idx']}]"
        colour = _COLOURS.get(data.get("op", ""), "white")
        lines.append(f'  "{vid}" [label="{label}", style=filled, fillcolor="{colour}"];')
    for a, b in g.edges():
        lines.append(f'  "{a}" -> "{b}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graph(p: Program, out: str | Path) -> list[Path]:
    """Write ``OUT.dot`` and, if matplotlib is importable, ``OUT.png``. Returns the files written."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix in (".dot", ".png") else out
    dot = base.with_suffix(".dot")
    dot.write_text(to_dot(p))
    written = [dot]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import networkx as nx
    except ImportError:
        return written
    g = dataflow_graph(p)
    layers = {}
    for depth, nodes in enumerate(nx.topological_generations(g)):
        for n in nodes:
            layers[n] = depth
    nx.set_node_attributes(g, layers, "layer")
    pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal")
    pos = {k: (x, -y) for k, (x, y) in pos.items()}
    fig, ax = plt.subplots(figsize=(max(6, len(g) * 0.45), max(4, len(set(layers.values())) * 0.7)))
    colours = [_COLOURS.get(g.nodes[n].get("op", ""), "#ffffff") for n in g]
    nx.draw_networkx(g, pos, ax=ax, labels={n: g.nodes[n].get("label", n) for n in g}, node_color=colours,
                     node_shape="s", node_size=900, font_size=7, arrows=True)
    ax.set_axis_off()
    png = base.with_suffix(".png")
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(png)
    return written
