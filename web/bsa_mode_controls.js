// Shows only the sparsity control of the selected threshold_mode on the BSA Sparse Attention node: statistical
// reads stat_lambda, cumulative reads kv_threshold, and a slider that does nothing misleads. The hidden widget
// keeps its value and its place in widgets_values (saved workflows and web/bsa_migrate.js read them by
// position), and the queued prompt still carries it. Nodes 2.0 (Vue nodes) in frontend 1.32 draws from a snapshot
// of the widgets and keeps showing both sliders; their tooltips say which mode each belongs to.
import { app } from "../../scripts/app.js";

const NODE_TYPE = "BSASparseAttention";
const MODE_CONTROL = { statistical: "stat_lambda", cumulative: "kv_threshold" };
// Older LiteGraph has no widget.hidden and draws nothing for a widget type it does not know.
const FALLBACK_HIDDEN_TYPE = "bsa-hidden";
const hiddenWidgets = new WeakMap(); // hidden widget -> what hiding changed on it

function setWidgetHidden(node, widget, hide) {
  if (hiddenWidgets.has(widget) === hide) return false;
  if (hide) {
    const changed = { computeSize: Object.getOwnPropertyDescriptor(widget, "computeSize") };
    // Frontends with node.isWidgetVisible skip a hidden widget when drawing, hit-testing and sizing the node,
    // but 1.32 still lays it out at its height: a zero height (LiteGraph adds 4 per widget) closes the gap.
    if (typeof node.isWidgetVisible === "function") widget.hidden = true;
    else [changed.type, widget.type] = [widget.type, FALLBACK_HIDDEN_TYPE];
    widget.computeSize = () => [0, -4];
    hiddenWidgets.set(widget, changed);
  } else {
    const changed = hiddenWidgets.get(widget);
    if (changed.computeSize) Object.defineProperty(widget, "computeSize", changed.computeSize);
    else delete widget.computeSize;
    if ("type" in changed) widget.type = changed.type;
    else widget.hidden = false;
    hiddenWidgets.delete(widget);
  }
  return true;
}

// Returns whether a control was shown or hidden.
function showActiveModeControl(node) {
  const widget = (name) => node.widgets?.find((w) => w.name === name);
  const active = MODE_CONTROL[widget("threshold_mode")?.value];
  if (!active) return false; // a mode this file does not know: leave every control visible
  let changed = false;
  for (const name of Object.values(MODE_CONTROL)) {
    const control = widget(name);
    if (control) changed = setWidgetHidden(node, control, name !== active) || changed;
  }
  return changed;
}

// The node has no widget that grows, so any height beyond its widgets is an empty band at the bottom.
function fitHeight(node) {
  const [minWidth, height] = node.computeSize();
  node.setSize([Math.max(node.size[0], minWidth), height]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "ComfyUI-BSA.ModeControls",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const { onNodeCreated, onConfigure } = nodeType.prototype;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      const mode = this.widgets?.find((w) => w.name === "threshold_mode");
      if (mode) {
        const callback = mode.callback;
        mode.callback = (...callbackArgs) => {
          const callbackResult = callback?.apply(mode, callbackArgs);
          if (showActiveModeControl(this)) fitHeight(this);
          return callbackResult;
        };
      }
      showActiveModeControl(this);
      fitHeight(this); // the node was sized before a control was hidden
      return result;
    };
    // Loading a workflow, pasting, undo and redo set the saved values and size here, after onNodeCreated; a
    // size saved where both sliders showed (before this file, or Nodes 2.0) would leave a gap.
    nodeType.prototype.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      showActiveModeControl(this);
      fitHeight(this);
      return result;
    };
  },
});
