-- Argo CD health of a loraplex.dev SharedBasePool, read from the conditions the operator writes.
-- Suspended: Suspended. Degraded: ReplicaFailure. Healthy: Ready. Progressing: not yet observed at
-- this generation, or replicas still starting.
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

local function count(value)
  if value == nil then
    return 0
  end
  return value
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the loraplex operator to observe the pool"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = string.format("Waiting for the loraplex operator to observe generation %d", generation)
  return hs
end

local suspended = condition("Suspended")
if isTrue(suspended) then
  hs.status = "Suspended"
  hs.message = describe("Suspended", suspended)
  return hs
end

local failure = condition("ReplicaFailure")
if isTrue(failure) then
  hs.status = "Degraded"
  hs.message = describe("A trainer replica failed", failure)
  return hs
end

local ready = condition("Ready")
if isTrue(ready) then
  local capacity = obj.status.capacity or {}
  local message = string.format(
    "%d/%d replicas ready, %d/%d adapter slots used",
    count(obj.status.readyReplicas), count(obj.status.replicas),
    count(capacity.usedSlots), count(capacity.adapterSlots))
  -- With serving on, the pool is healthy once its serving replicas answer too.
  local serving = (obj.spec or {}).serving or {}
  if serving.enabled then
    local wanted = serving.replicas or 1
    local served = count((obj.status.serving or {}).readyReplicas)
    message = string.format("%s; serving %d/%d ready", message, served, wanted)
    if served < wanted then
      hs.status = "Progressing"
      hs.message = message
      return hs
    end
  end
  hs.status = "Healthy"
  hs.message = message
  return hs
end

hs.status = "Progressing"
hs.message = describe("Waiting for trainer replicas to become ready", ready)
return hs
