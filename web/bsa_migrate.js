// Loads workflows saved before the BSA Sparse Attention node's widgets were reordered (threshold_mode and
// its sparsity controls first). A saved UI workflow stores widget values by position, so an old node's values
// would land in the wrong widgets; this rewrites them by name before the graph is configured.
import { app } from "../../scripts/app.js";

const NODE_TYPE = "BSASparseAttention";
// The old order. A saved node whose first value is a number (keep_ratio) has it: today's first widget is the
// threshold_mode combo, whose value is a string.
const OLD_WIDGET_ORDER = ["keep_ratio", "kv_threshold", "cube_size", "threshold_mode", "start_percent",
  "end_percent", "stat_lambda", "min_blocks", "dense_blocks", "min_tokens", "pooled_remainder"];
const WIDGET_ORDER = ["threshold_mode", "stat_lambda", "kv_threshold", "keep_ratio", "cube_size", "start_percent",
  "end_percent", "min_blocks", "dense_blocks", "min_tokens", "pooled_remainder"];

function migrateNode(node) {
  const values = node?.widgets_values;
  if (node?.type !== NODE_TYPE || !Array.isArray(values) || typeof values[0] !== "number") return false;
  const byName = Object.fromEntries(OLD_WIDGET_ORDER.map((name, i) => [name, values[i]]));
  node.widgets_values = WIDGET_ORDER.map((name) => byName[name]).filter((value) => value !== undefined);
  return true;
}

app.registerExtension({
  name: "ComfyUI-BSA.WidgetOrderMigration",
  beforeConfigureGraph(graphData) {
    const graphs = [graphData, ...(graphData?.definitions?.subgraphs ?? [])];
    const migrated = graphs.flatMap((graph) => (graph?.nodes ?? []).filter(migrateNode));
    if (migrated.length) console.info(`[BSA] moved the widget values of ${migrated.length} BSA node(s) saved in the old order`);
  },
});
