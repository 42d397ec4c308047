-- Argo CD health of a loraplex.dev LoRAExperiment, read from the conditions the operator writes,
-- in the order of its display phase: Failed, Succeeded, Suspended, Training, Placed, Pending.
-- Degraded: Failed. Healthy: Succeeded, or Training with Ready (an experiment that trains well is
-- healthy; waiting for hours-long training to finish would stall every sync). Suspended: Suspended.
-- Progressing: not yet observed at this generation, loading, waiting for a replica or the trainer.
local hs = {}

local function condition(kind)
  if obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function isTrue(c)
  return c ~= nil and c.status == "True"
end

-- The first non-empty message of the given conditions (any may be nil), else the first reason,
-- else the fallback.
local function describe(fallback, ...)
  local n = select("#", ...)
  for _, field in ipairs({ "message", "reason" }) do
    for i = 1, n do
      local c = select(i, ...)
      if c ~= nil and c[field] ~= nil and c[field] ~= "" then
        return c[field]
      end
    end
  end
  return fallback
end

local function steps()
  local t = obj.status.training
  if t == nil or t.step == nil then
    return "starting"
  end
  if t.totalSteps ~= nil and t.totalSteps > 0 then
    return string.format("step %d/%d", t.step, t.totalSteps)
  end
  return string.format("step %d", t.step)
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the loraplex operator to observe the experiment"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = string.format("Waiting for the loraplex operator to observe generation %d", generation)
  return hs
end

local failed = condition("Failed")
if isTrue(failed) then
  hs.status = "Degraded"
  hs.message = describe("Failed", failed)
  return hs
end

local succeeded = condition("Succeeded")
if isTrue(succeeded) then
  hs.status = "Healthy"
  hs.message = describe("Training completed", succeeded)
  return hs
end

local suspended = condition("Suspended")
if isTrue(suspended) then
  hs.status = "Suspended"
  hs.message = describe("Suspended", suspended)
  return hs
end

local training = condition("Training")
local ready = condition("Ready")
if isTrue(training) and isTrue(ready) then
  hs.status = "Healthy"
  hs.message = "Training: " .. steps()
  return hs
end
-- Training Unknown: the adapter is loading, or the trainer's heartbeat is overdue.
if training ~= nil and training.status ~= "False" then
  hs.status = "Progressing"
  hs.message = describe("Starting training", training, ready)
  return hs
end

local placed = condition("Placed")
if isTrue(placed) then
  hs.status = "Progressing"
  hs.message = describe("Placed; waiting for the trainer", placed)
  return hs
end

hs.status = "Progressing"
hs.message = describe("Waiting for a replica with free capacity", placed)
return hs
