"""The functions read-only SQL may call: an allow-list, so anything new is denied.

Generated once from ``system.functions`` of chdb 26.9 by category and then
reviewed by hand. Included: aggregates and window functions, type conversion,
dates and times, arrays, maps, tuples, strings (search, replace, split),
JSON, hashes, maths, arithmetic, rounding, logic and conditionals, nulls,
bits, encodings, UUIDs, random numbers, IP addresses, URL *parsing* and
distances. Left out on purpose (a function not listed here is refused):

- anything that reaches outside the query: ``file``, ``url``-style table
  functions, dictionaries (``dictGet*``, ``joinGet*``, the embedded
  ``region*`` dictionaries), ``catboost``/``naiveBayes*``/``evalMLMethod``
  (model files), ``*Custom`` top-level-domain lists (files named in the
  server's configuration), ``ai*`` (network), ``chdb``;
- the server's own state: ``getSetting*``, ``getServerSetting``,
  ``getMergeTreeSetting``, ``getMacro``, ``hostName``/``FQDN``,
  ``filesystem*``, ``uptime``, ``buildId``, ``currentUser``/``Roles``/``Profiles``,
  ``queryID``, ``tcpPort``, ``getClientHTTPHeader``, ``showCertificate``,
  ``hasColumnInTable``, ``zookeeperSessionUptime``, ``transaction*``;
- introspection (``addressToLine``, ``demangle``, ...), ``logTrace`` (writes
  the server log), ``sleep``/``sleepEachRow`` (hold a thread for nothing),
  ``formatRow*``/``groupFormat`` (output formats can read schema files),
  ``kql*``, ``fuzz*``, the query-text functions (``formatQuery``, ...),
  geo, bitmap and time-series helpers nobody metering usage needs.

``EXTRA_FUNCTIONS`` are what the parser itself writes for SQL syntax and
that ``system.functions`` does not list (``x -> ...`` is ``lambda``,
``EXISTS (...)`` is ``exists``, ``GROUPING(...)`` is ``grouping``).
Aggregate combinators (``sumIf``, ``countDistinct``, ``uniqExactMerge``,
``sumMap``...) are accepted when their base is an allowed aggregate.
"""

from __future__ import annotations


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Aggregate and window functions (the combinators below extend them).
AGGREGATE_FUNCTIONS = _names(
    """
    BIT_AND BIT_OR BIT_XOR COVAR_POP COVAR_SAMP STD STDDEV STDDEV_POP STDDEV_SAMP VAR_POP
    VAR_SAMP analysisOfVariance anova any anyHeavy anyLast anyLastRespectNulls
    anyLast_respect_nulls anyRespectNulls anyValueRespectNulls any_respect_nulls any_value
    any_value_respect_nulls approx_top_count approx_top_k approx_top_sum argAndMax argAndMin
    argMax argMin array_agg avg avgWeighted boundingRatio categoricalInformationValue
    contingency corr corrMatrix corrStable count covarPop covarPopMatrix covarPopStable
    covarSamp covarSampMatrix covarSampStable cramersV cramersVBiasCorrected cume_dist
    deltaSum deltaSumTimestamp denseRank dense_rank distinctDynamicTypes distinctJSONPaths
    distinctJSONPathsAndTypes entropy estimateCompressionRatio exponentialMovingAverage
    exponentialTimeDecayedAvg exponentialTimeDecayedCount exponentialTimeDecayedMax
    exponentialTimeDecayedSum firstValueRespectNulls first_value first_value_respect_nulls
    gini groupArray groupArrayInsertAt groupArrayIntersect groupArrayLast
    groupArrayMovingAvg groupArrayMovingSum groupArraySample groupArraySorted groupBitAnd
    groupBitOr groupBitXor groupBitmap groupBitmapAnd groupBitmapOr groupBitmapXor
    groupConcat groupNumericIndexedVector groupUniqArray group_concat histogram
    intervalLengthSum kolmogorovSmirnovTest kurtPop kurtSamp lag lagInFrame
    largestTriangleThreeBuckets lastValueRespectNulls last_value last_value_respect_nulls
    lead leadInFrame lttb mannWhitneyUTest max maxIntersections maxIntersectionsPosition
    maxMappedArrays max_by meanZTest median medianBFloat16 medianBFloat16Weighted medianDD
    medianDeterministic medianExact medianExactHigh medianExactLow medianExactWeighted
    medianExactWeightedInterpolated medianGK medianInterpolatedWeighted medianTDigest
    medianTDigestWeighted medianTiming medianTimingWeighted mergedJSONPatch min
    minMappedArrays min_by nonNegativeDerivative nothing nothingNull nothingUInt64 nth_value
    ntile percentRank percent_rank quantile quantileBFloat16 quantileBFloat16Weighted
    quantileDD quantileDeterministic quantileExact quantileExactExclusive quantileExactHigh
    quantileExactInclusive quantileExactLow quantileExactWeighted
    quantileExactWeightedInterpolated quantileGK quantileInterpolatedWeighted
    quantilePrometheusHistogram quantileTDigest quantileTDigestWeighted quantileTiming
    quantileTimingWeighted quantiles quantilesBFloat16 quantilesBFloat16Weighted quantilesDD
    quantilesDeterministic quantilesExact quantilesExactExclusive quantilesExactHigh
    quantilesExactInclusive quantilesExactLow quantilesExactWeighted
    quantilesExactWeightedInterpolated quantilesGK quantilesInterpolatedWeighted
    quantilesPrometheusHistogram quantilesTDigest quantilesTDigestWeighted quantilesTiming
    quantilesTimingWeighted rank rankCorr regr_avgx regr_avgy regr_count regr_intercept
    regr_r2 regr_slope regr_sxx regr_sxy regr_syy retention row_number sequenceCount
    sequenceMatch sequenceMatchEvents sequenceNextNode simpleLinearRegression
    singleValueOrNull skewPop skewSamp sparkBar sparkbar stddevPop stddevPopStable
    stddevSamp stddevSampStable string_agg studentTTest studentTTestOneSample sum sumCount
    sumKahan sumMapFiltered sumMapFilteredWithOverflow sumMapWithOverflow sumMappedArrays
    sumWithOverflow theilsU timeSeriesAvgToGrid timeSeriesBottomKMasks
    timeSeriesChangesToGrid timeSeriesCountToGrid timeSeriesDeltaToGrid
    timeSeriesDerivToGrid timeSeriesGroupArray timeSeriesIncreaseToGrid
    timeSeriesInstantDeltaToGrid timeSeriesInstantRateToGrid timeSeriesLastToGrid
    timeSeriesLastTwoSamples timeSeriesLimitKMasks timeSeriesMaxToGrid timeSeriesMinToGrid
    timeSeriesPredictLinearToGrid timeSeriesRateToGrid timeSeriesResampleToGridWithStaleness
    timeSeriesResetsToGrid timeSeriesSumToGrid timeSeriesTimestampOfMaxToGrid
    timeSeriesTimestampOfMinToGrid timeSeriesTopKMasks topK topKWeighted uniq uniqCombined
    uniqCombined64 uniqExact uniqHLL12 uniqUpTo varPop varPopStable varSamp varSampStable
    welchTTest windowFunnel
    """
)

# Ordinary functions, with their aliases.
SCALAR_FUNCTIONS = _names(
    """
    CARDINALITY CAST CHARACTER_LENGTH CHAR_LENGTH CRC32 CRC32IEEE CRC64 DATABASE DATE
    DATE_DIFF DATE_FORMAT DATE_TRUNC DAY DAYOFMONTH DAYOFWEEK DAYOFYEAR FORMAT_BYTES
    FROM_BASE64 FROM_DAYS FROM_UNIXTIME HOUR INET6_ATON INET6_NTOA INET_ATON INET_NTOA
    IPv4CIDRToRange IPv4NumToString IPv4NumToStringClassC IPv4StringToNum
    IPv4StringToNumOrDefault IPv4StringToNumOrNull IPv4ToIPv6 IPv6CIDRToRange
    IPv6NumToString IPv6StringToNum IPv6StringToNumOrDefault IPv6StringToNumOrNull
    JSONAllPaths JSONAllPathsWithTypes JSONAllValues JSONArrayLength JSONDynamicPaths
    JSONDynamicPathsWithTypes JSONExtract JSONExtractArrayRaw
    JSONExtractArrayRawCaseInsensitive JSONExtractBool JSONExtractBoolCaseInsensitive
    JSONExtractCaseInsensitive JSONExtractFloat JSONExtractFloatCaseInsensitive
    JSONExtractInt JSONExtractIntCaseInsensitive JSONExtractKeys JSONExtractKeysAndValues
    JSONExtractKeysAndValuesCaseInsensitive JSONExtractKeysAndValuesRaw
    JSONExtractKeysAndValuesRawCaseInsensitive JSONExtractKeysCaseInsensitive JSONExtractRaw
    JSONExtractRawCaseInsensitive JSONExtractString JSONExtractStringCaseInsensitive
    JSONExtractUInt JSONExtractUIntCaseInsensitive JSONHas JSONKey JSONLength JSONMergePatch
    JSONSharedDataPaths JSONSharedDataPathsWithTypes JSONType JSON_ARRAY_LENGTH JSON_EXISTS
    JSON_QUERY JSON_VALUE L1Distance L1Norm L1Normalize L2Distance L2DistanceTransposed
    L2DistanceTransposedQuantized L2Norm L2Normalize L2SquaredDistance L2SquaredNorm
    LAST_DAY LinfDistance LinfNorm LinfNormalize LpDistance LpNorm LpNormalize
    MAP_FROM_ARRAYS MD4 MD5 MICROSECOND MILLISECOND MINUTE MONTH NANOSECOND NATURAL_SORT_KEY
    OCTET_LENGTH QUARTER REGEXP_EXTRACT REGEXP_MATCHES REGEXP_REPLACE REGEXP_SUBSTR
    RIPEMD160 SCHEMA SECOND SHA1 SHA224 SHA256 SHA384 SHA512 SHA512_256 SUBSTRING_INDEX
    TIMESTAMP_DIFF TO_BASE64 TO_DAYS TO_UNIXTIME URLHash URLHierarchy URLPathHierarchy
    UTCTimestamp UTC_timestamp UUIDNumToString UUIDStringToNum UUIDToNum UUIDv7ToDateTime
    YEAR YYYYMMDDToDate YYYYMMDDToDate32 YYYYMMDDhhmmssToDateTime YYYYMMDDhhmmssToDateTime64
    _CAST abs accurateCast accurateCastOrDefault accurateCastOrNull acos acosh addDate
    addDays addHours addInterval addMicroseconds addMilliseconds addMinutes addMonths
    addNanoseconds addQuarters addSeconds addTupleOfIntervals addWeeks addYears age
    alphaTokens and appendTrailingCharIfAbsent array arrayAUC arrayAUCPR arrayAll
    arrayAutocorrelation arrayAvg arrayBottomK arrayCompact arrayConcat arrayCount
    arrayCumSum arrayCumSumNonNegative arrayDifference arrayDistinct arrayDotProduct
    arrayElement arrayElementOrNull arrayEnumerate arrayEnumerateDense
    arrayEnumerateDenseRanked arrayEnumerateUniq arrayEnumerateUniqRanked arrayExcept
    arrayExists arrayFill arrayFilter arrayFirst arrayFirstIndex arrayFirstOrNull
    arrayFlatten arrayFlattenedLength arrayFold arrayIntersect arrayJaccardIndex arrayJoin
    arrayLast arrayLastIndex arrayLastOrNull arrayLevenshteinDistance
    arrayLevenshteinDistanceWeighted arrayMap arrayMax arrayMin arrayNormalizedGini
    arrayPRAUC arrayPartialReverseSort arrayPartialShuffle arrayPartialSort arrayPopBack
    arrayPopFront arrayProduct arrayPushBack arrayPushFront arrayROCAUC arrayRandomSample
    arrayReduce arrayReduceInRanges arrayRemove arrayResize arrayReverse arrayReverseFill
    arrayReverseSort arrayReverseSplit arrayRotateLeft arrayRotateRight arrayShiftLeft
    arrayShiftRight arrayShingles arrayShuffle arraySimilarity arraySlice arraySort
    arraySplit arrayStringConcat arraySum arraySymmetricDifference arrayTopK arrayTranspose
    arrayUnion arrayUniq arrayWithConstant arrayZip arrayZipUnaligned array_remove
    array_to_string ascii asin asinh assumeNotNull atan atan2 atanh avg2 bar base32Decode
    base32Encode base58Decode base58Encode base64Decode base64Encode base64URLDecode
    base64URLEncode basename bin bitAnd bitCount bitHammingDistance bitNot bitOr
    bitPositionsToArray bitRotateLeft bitRotateRight bitShiftLeft bitShiftRight bitSlice
    bitTest bitTestAll bitTestAny bitXor bitmaskToArray bitmaskToList blockNumber blockSize
    byteHammingDistance byteSize byteSlice byteSwap caseFoldUTF8 caseWithExpr
    caseWithExpression caseWithoutExpr caseWithoutExpression cbrt ceil ceiling changeDay
    changeHour changeMinute changeMonth changeSecond changeYear char cityHash64 clamp
    coalesce compareSubstrings concat concatAssumeInjective concatWithSeparator
    concatWithSeparatorAssumeInjective concat_ws conv cos cosh cosineDistance
    cosineDistanceTransposed cosineDistanceTransposedQuantized countDigits countEqual
    countMatches countMatchesCaseInsensitive countSubstrings countSubstringsCaseInsensitive
    countSubstringsCaseInsensitiveUTF8 curdate currentDatabase current_database current_date
    current_timestamp cutFragment cutIPv6 cutQueryString cutQueryStringAndFragment
    cutToFirstSignificantSubdomain cutToFirstSignificantSubdomainRFC
    cutToFirstSignificantSubdomainWithWWW cutToFirstSignificantSubdomainWithWWWRFC
    cutURLParameter cutWWW damerauLevenshteinDistance dateDiff dateName
    dateTime64ToSnowflakeID dateTimeToSnowflakeID dateTimeToUUIDv7 dateTrunc date_bin
    date_diff decodeHTMLComponent decodeURLComponent decodeURLFormComponent
    decodeXMLComponent defaultValueOfArgumentType defaultValueOfTypeName degrees
    distanceCosine distanceCosineTransposed distanceL1 distanceL2 distanceL2Squared
    distanceL2Transposed distanceLinf distanceLp divide divideDecimal divideOrNull domain
    domainRFC domainWithoutWWW domainWithoutWWWRFC dotProduct dotProductTransposed
    dotProductTransposedQuantized dynamicElement dynamicType e editDistance editDistanceUTF8
    empty emptyArrayDate emptyArrayDateTime emptyArrayFloat32 emptyArrayFloat64
    emptyArrayInt16 emptyArrayInt32 emptyArrayInt64 emptyArrayInt8 emptyArrayString
    emptyArrayToSingle emptyArrayUInt16 emptyArrayUInt32 emptyArrayUInt64 emptyArrayUInt8
    encodeURLComponent encodeURLFormComponent encodeXMLComponent endsWith
    endsWithCaseInsensitive endsWithCaseInsensitiveUTF8 endsWithUTF8 equals erf erfc
    errorCodeToName exp exp10 exp2 extract extractAll extractAllGroups
    extractAllGroupsHorizontal extractAllGroupsVertical extractGroups extractKeyValuePairs
    extractKeyValuePairsWithEscaping extractTextFromHTML extractURLParameter
    extractURLParameterNames extractURLParameters factorial farmFingerprint64 farmHash64
    finalizeAggregation financialInternalRateOfReturn financialInternalRateOfReturnExtended
    financialNetPresentValue financialNetPresentValueExtended firstLine firstNonDefault
    firstSignificantSubdomain firstSignificantSubdomainRFC flatten flattenTuple floor format
    formatDateTime formatDateTimeInJodaSyntax formatReadableDecimalSize
    formatReadableQuantity formatReadableSize formatReadableTimeDelta fragment
    fromDaysSinceYearZero fromDaysSinceYearZero32 fromModifiedJulianDay
    fromModifiedJulianDayOrNull fromUTCTimestamp fromUnixTimestamp fromUnixTimestamp64Micro
    fromUnixTimestamp64Milli fromUnixTimestamp64Nano fromUnixTimestamp64Second
    fromUnixTimestampInJodaSyntax from_utc_timestamp gccMurmurHash gcd generateSnowflakeID
    generateUUIDv4 generateUUIDv7 getSubcolumn globalIn globalNotIn globalNotNullIn
    globalNullIn greater greaterOrEquals greatest halfMD5 has hasAll hasAllToken
    hasAllTokens hasAny hasAnyToken hasAnyTokens hasPhrase hasSubsequence
    hasSubsequenceCaseInsensitive hasSubsequenceCaseInsensitiveUTF8 hasSubsequenceUTF8
    hasSubstr hasToken hasTokenCaseInsensitive hasTokenCaseInsensitiveOrNull hasTokenOrNull
    hex highlight hilbertDecode hilbertEncode hiveHash hop hopEnd hopStart hypot icebergHash
    identity if ifNotFinite ifNull ignore ilike in indexOf indexOfAssumeSorted initcap
    initcapUTF8 initializeAggregation instr intDiv intDivOrNull intDivOrZero intExp10
    intExp2 intHash32 intHash64 isASCII isConstant isDecimalOverflow isDistinctFrom
    isDynamicElementInSharedData isFinite isIPAddressInRange isIPv4String isIPv6String
    isInfinite isNaN isNotDistinctFrom isNotNull isNull isNullable isPrime isProbablePrime
    isValidASCII isValidJSON isValidUTF8 isZeroOrNull jaroSimilarity jaroWinklerSimilarity
    javaHash javaHashUTF16LE jsonMergePatch jumpConsistentHash kafkaMurmurHash keccak256
    kostikConsistentHash lcase lcm least left leftPad leftPadUTF8 leftUTF8 length lengthUTF8
    less lessOrEquals levenshteinDistance levenshteinDistanceUTF8 lgamma like ln localtime
    localtimestamp locate log log10 log1p log2 lower lowerUTF8 lpad ltrim makeDate
    makeDate32 makeDateTime makeDateTime64 map mapAdd mapAll mapApply mapConcat mapContains
    mapContainsKey mapContainsKeyLike mapContainsValue mapContainsValueLike mapExists
    mapExtractKeyLike mapExtractValueLike mapFilter mapFromArrays mapFromString mapKeys
    mapPartialReverseSort mapPartialSort mapPopulateSeries mapReverseSort mapSort
    mapSubtract mapUpdate mapValues match matchCaseInsensitive matchPhrase materialize max2
    metroHash64 mid midpoint min2 minSampleSizeContinous minSampleSizeContinuous
    minSampleSizeConversion minus mismatches mod modOrNull modulo moduloLegacy moduloOrNull
    moduloOrZero monthName mortonDecode mortonEncode multiFuzzyMatchAllIndices
    multiFuzzyMatchAny multiFuzzyMatchAnyIndex multiIf multiMatchAllIndices multiMatchAny
    multiMatchAnyIndex multiSearchAllPositions multiSearchAllPositionsCaseInsensitive
    multiSearchAllPositionsCaseInsensitiveUTF8 multiSearchAllPositionsUTF8 multiSearchAny
    multiSearchAnyCaseInsensitive multiSearchAnyCaseInsensitiveUTF8 multiSearchAnyUTF8
    multiSearchFirstIndex multiSearchFirstIndexCaseInsensitive
    multiSearchFirstIndexCaseInsensitiveUTF8 multiSearchFirstIndexUTF8
    multiSearchFirstPosition multiSearchFirstPositionCaseInsensitive
    multiSearchFirstPositionCaseInsensitiveUTF8 multiSearchFirstPositionUTF8 multiply
    multiplyDecimal murmurHash2_32 murmurHash2_64 murmurHash3_128 murmurHash3_32
    murmurHash3_64 naiveBayesNgrams naturalSortKey negate neighbor netloc ngramDistance
    ngramDistanceCaseInsensitive ngramDistanceCaseInsensitiveUTF8 ngramDistanceUTF8
    ngramMinHash ngramMinHashArg ngramMinHashArgCaseInsensitive
    ngramMinHashArgCaseInsensitiveUTF8 ngramMinHashArgUTF8 ngramMinHashCaseInsensitive
    ngramMinHashCaseInsensitiveUTF8 ngramMinHashUTF8 ngramSearch ngramSearchCaseInsensitive
    ngramSearchCaseInsensitiveUTF8 ngramSearchUTF8 ngramSimHash ngramSimHashCaseInsensitive
    ngramSimHashCaseInsensitiveUTF8 ngramSimHashUTF8 ngrams normL1 normL2 normL2Squared
    normLinf normLp normalizeL1 normalizeL2 normalizeLinf normalizeLp normalizeUTF8NFC
    normalizeUTF8NFD normalizeUTF8NFKC normalizeUTF8NFKCCasefold normalizeUTF8NFKD not
    notEmpty notEquals notHas notILike notIn notLike notMatch notMatchCaseInsensitive
    notNullIn now now64 nowInBlock nowInBlock64 nullIf nullIn or overlay overlayUTF8
    parseDateTime parseDateTime32BestEffort parseDateTime32BestEffortOrNull
    parseDateTime32BestEffortOrZero parseDateTime64 parseDateTime64BestEffort
    parseDateTime64BestEffortOrNull parseDateTime64BestEffortOrZero
    parseDateTime64BestEffortUS parseDateTime64BestEffortUSOrNull
    parseDateTime64BestEffortUSOrZero parseDateTime64InJodaSyntax
    parseDateTime64InJodaSyntaxOrNull parseDateTime64InJodaSyntaxOrZero
    parseDateTime64OrNull parseDateTime64OrZero parseDateTimeBestEffort
    parseDateTimeBestEffortOrNull parseDateTimeBestEffortOrZero parseDateTimeBestEffortUS
    parseDateTimeBestEffortUSOrNull parseDateTimeBestEffortUSOrZero
    parseDateTimeInJodaSyntax parseDateTimeInJodaSyntaxOrNull
    parseDateTimeInJodaSyntaxOrZero parseDateTimeOrNull parseDateTimeOrZero
    parseISO8601Duration parseReadableSize parseReadableSizeOrNull parseReadableSizeOrZero
    parseTimeDelta path pathFull pi plus pmod pmodOrNull port portRFC position
    positionCaseInsensitive positionCaseInsensitiveUTF8 positionUTF8 positiveModulo
    positiveModuloOrNull positive_modulo positive_modulo_or_null pow power prettyPrintJSON
    printf proportionsZTest protocol queryString queryStringAndFragment radians rand rand32
    rand64 randBernoulli randBinomial randCanonical randChiSquared randConstant
    randExponential randFisherF randLogNormal randNegativeBinomial randNormal randPoisson
    randStudentT randUniform randomFixedString randomHadamardTransform randomPrintableASCII
    randomString randomStringUTF8 range regexpExtract regexpInstr regexpPosition
    regexpQuoteMeta regexp_instr reinterpret reinterpretAsDate reinterpretAsDateTime
    reinterpretAsFixedString reinterpretAsFloat32 reinterpretAsFloat64 reinterpretAsInt128
    reinterpretAsInt16 reinterpretAsInt256 reinterpretAsInt32 reinterpretAsInt64
    reinterpretAsInt8 reinterpretAsString reinterpretAsUInt128 reinterpretAsUInt16
    reinterpretAsUInt256 reinterpretAsUInt32 reinterpretAsUInt64 reinterpretAsUInt8
    reinterpretAsUUID removeAccentsUTF8 removeDiacriticsUTF8 repeat replace replaceAll
    replaceOne replaceRegexpAll replaceRegexpOne replicate reverse reverseBySeparator
    reverseUTF8 right rightPad rightPadUTF8 rightUTF8 round roundAge roundBankers roundDown
    roundDuration roundToExp2 rowNumberInAllBlocks rowNumberInBlock rpad rtrim
    runningAccumulate runningDifference runningDifferenceStartingWithFirstValue
    scalarProduct scalarProductTransposed sigmoid sign simpleJSONExtractBool
    simpleJSONExtractFloat simpleJSONExtractInt simpleJSONExtractRaw simpleJSONExtractString
    simpleJSONExtractUInt simpleJSONHas sin sinh sipHash128 sipHash128Keyed
    sipHash128Reference sipHash128ReferenceKeyed sipHash64 sipHash64Keyed
    snowflakeIDToDateTime snowflakeIDToDateTime64 soundex space sparseGrams
    sparseGramsHashes sparseGramsHashesUTF8 sparseGramsUTF8 splitByAlpha splitByChar
    splitByNonAlpha splitByRegexp splitByString splitByWhitespace sqid sqidDecode sqidEncode
    sqr sqrt startsWith startsWithCaseInsensitive startsWithCaseInsensitiveUTF8
    startsWithUTF8 str_to_date str_to_map stringBytesEntropy stringBytesUniq
    stringJaccardIndex stringJaccardIndexUTF8 subDate substr substring substringIndex
    substringIndexUTF8 substringUTF8 subtractDays subtractHours subtractInterval
    subtractMicroseconds subtractMilliseconds subtractMinutes subtractMonths
    subtractNanoseconds subtractQuarters subtractSeconds subtractTupleOfIntervals
    subtractWeeks subtractYears tan tanh tgamma throwIf timeDiff timeSlot timeSlots timeZone
    timeZoneOf timeZoneOffset time_bucket timestamp timestampDiff timestamp_diff timezone
    timezoneOf timezoneOffset toBFloat16 toBFloat16OrNull toBFloat16OrZero toBool
    toColumnTypeName toDate toDate32 toDate32OrDefault toDate32OrNull toDate32OrZero
    toDateOrDefault toDateOrNull toDateOrZero toDateTime toDateTime32 toDateTime64
    toDateTime64OrDefault toDateTime64OrNull toDateTime64OrZero toDateTimeOrDefault
    toDateTimeOrNull toDateTimeOrZero toDayOfMonth toDayOfWeek toDayOfYear toDaysInMonth
    toDaysSinceYearZero toDecimal128 toDecimal128OrDefault toDecimal128OrNull
    toDecimal128OrZero toDecimal256 toDecimal256OrDefault toDecimal256OrNull
    toDecimal256OrZero toDecimal32 toDecimal32OrDefault toDecimal32OrNull toDecimal32OrZero
    toDecimal64 toDecimal64OrDefault toDecimal64OrNull toDecimal64OrZero toDecimalString
    toFixedString toFloat32 toFloat32OrDefault toFloat32OrNull toFloat32OrZero toFloat64
    toFloat64OrDefault toFloat64OrNull toFloat64OrZero toHour toIPv4 toIPv4OrDefault
    toIPv4OrNull toIPv4OrZero toIPv6 toIPv6OrDefault toIPv6OrNull toIPv6OrZero toISOWeek
    toISOYear toInt128 toInt128OrDefault toInt128OrNull toInt128OrZero toInt16
    toInt16OrDefault toInt16OrNull toInt16OrZero toInt256 toInt256OrDefault toInt256OrNull
    toInt256OrZero toInt32 toInt32OrDefault toInt32OrNull toInt32OrZero toInt64
    toInt64OrDefault toInt64OrNull toInt64OrZero toInt8 toInt8OrDefault toInt8OrNull
    toInt8OrZero toInterval toIntervalDay toIntervalHour toIntervalMicrosecond
    toIntervalMillisecond toIntervalMinute toIntervalMonth toIntervalNanosecond
    toIntervalQuarter toIntervalSecond toIntervalWeek toIntervalYear toJSONString
    toLastDayOfMonth toLastDayOfWeek toLowCardinality toMicrosecond toMillisecond toMinute
    toModifiedJulianDay toModifiedJulianDayOrNull toMonday toMonth toMonthNumSinceEpoch
    toNanosecond toNullable toQuarter toRelativeDayNum toRelativeHourNum toRelativeMinuteNum
    toRelativeMonthNum toRelativeQuarterNum toRelativeSecondNum toRelativeWeekNum
    toRelativeYearNum toSecond toStartOfDay toStartOfFifteenMinutes toStartOfFiveMinute
    toStartOfFiveMinutes toStartOfHour toStartOfISOYear toStartOfInterval
    toStartOfMicrosecond toStartOfMillisecond toStartOfMinute toStartOfMonth
    toStartOfNanosecond toStartOfQuarter toStartOfSecond toStartOfTenMinutes toStartOfWeek
    toStartOfYear toString toStringCutToZero toTime toTime64 toTime64OrNull toTime64OrZero
    toTimeOrNull toTimeOrZero toTimeWithFixedDate toTimeZone toTimezone toTypeName toUInt128
    toUInt128OrDefault toUInt128OrNull toUInt128OrZero toUInt16 toUInt16OrDefault
    toUInt16OrNull toUInt16OrZero toUInt256 toUInt256OrDefault toUInt256OrNull
    toUInt256OrZero toUInt32 toUInt32OrDefault toUInt32OrNull toUInt32OrZero toUInt64
    toUInt64OrDefault toUInt64OrNull toUInt64OrZero toUInt8 toUInt8OrDefault toUInt8OrNull
    toUInt8OrZero toUTCTimestamp toUUID toUUIDOrDefault toUUIDOrNull toUUIDOrZero
    toUnixTimestamp toUnixTimestamp64Micro toUnixTimestamp64Milli toUnixTimestamp64Nano
    toUnixTimestamp64Second toValidUTF8 toWeek toYYYYMM toYYYYMMDD toYYYYMMDDhhmmss toYear
    toYearNumSinceEpoch toYearWeek to_utc_timestamp today tokens tokensForLikePattern
    topLevelDomain topLevelDomainRFC transform translate translateUTF8 trim trimBoth
    trimLeft trimRight trunc truncate tryBase32Decode tryBase58Decode tryBase64Decode
    tryBase64URLDecode tumble tumbleEnd tumbleStart tuple tupleConcat tupleDivide
    tupleDivideByNumber tupleElement tupleHammingDistance tupleIntDiv tupleIntDivByNumber
    tupleIntDivOrZero tupleIntDivOrZeroByNumber tupleMinus tupleModulo tupleModuloByNumber
    tupleMultiply tupleMultiplyByNumber tupleNames tupleNegate tuplePlus
    tuplePositiveModuloByNumber tupleToNameValuePairs ucase unbin unhex unnest upper
    upperUTF8 variantElement variantType vectorDifference vectorSum visibleWidth
    visitParamExtractBool visitParamExtractFloat visitParamExtractInt visitParamExtractRaw
    visitParamExtractString visitParamExtractUInt visitParamHas week widthBucket
    width_bucket wordShingleMinHash wordShingleMinHashArg
    wordShingleMinHashArgCaseInsensitive wordShingleMinHashArgCaseInsensitiveUTF8
    wordShingleMinHashArgUTF8 wordShingleMinHashCaseInsensitive
    wordShingleMinHashCaseInsensitiveUTF8 wordShingleMinHashUTF8 wordShingleSimHash
    wordShingleSimHashCaseInsensitive wordShingleSimHashCaseInsensitiveUTF8
    wordShingleSimHashUTF8 wyHash64 xor xxHash32 xxHash64 xxHash64Spark xxh3 xxh3_128
    yandexConsistentHash yearweek yesterday
    """
)

# Names ClickHouse also accepts in any letter case (COUNT, Sum, ...).
CASE_INSENSITIVE = _names(
    """
    BIT_AND BIT_OR BIT_XOR CARDINALITY CAST CHARACTER_LENGTH CHAR_LENGTH COVAR_POP
    COVAR_SAMP CRC32 CRC32IEEE CRC64 DATABASE DATE DATE_FORMAT DATE_TRUNC DAY DAYOFMONTH
    DAYOFWEEK DAYOFYEAR FORMAT_BYTES FROM_BASE64 FROM_DAYS FROM_UNIXTIME HOUR INET6_ATON
    INET6_NTOA INET_ATON INET_NTOA JSON_ARRAY_LENGTH LAST_DAY MICROSECOND MILLISECOND MINUTE
    MONTH NANOSECOND NATURAL_SORT_KEY OCTET_LENGTH QUARTER REGEXP_EXTRACT REGEXP_MATCHES
    REGEXP_REPLACE REGEXP_SUBSTR SCHEMA SECOND STD STDDEV STDDEV_POP STDDEV_SAMP
    SUBSTRING_INDEX TO_BASE64 TO_DAYS TO_UNIXTIME UTCTimestamp UTC_timestamp VAR_POP
    VAR_SAMP YEAR YYYYMMDDToDate YYYYMMDDToDate32 YYYYMMDDhhmmssToDateTime _CAST abs acos
    addDate age analysisOfVariance anova any_value any_value_respect_nulls approx_top_count
    approx_top_k approx_top_sum arrayPartialShuffle arrayShuffle array_agg array_remove
    array_to_string ascii asin atan atan2 avg avg2 bin byteSlice byteSwap ceil ceiling char
    coalesce concat concat_ws corr cos count countSubstrings curdate current_database
    current_date current_timestamp dateDiff dateName date_bin degrees dense_rank
    distanceCosine distanceCosineTransposed distanceL1 distanceL2 distanceL2Squared
    distanceL2Transposed distanceLinf distanceLp exp factorial firstNonDefault first_value
    first_value_respect_nulls flatten floor from_utc_timestamp greatest group_concat
    hasSubsequence hasSubsequenceCaseInsensitive hasSubsequenceCaseInsensitiveUTF8
    hasSubsequenceUTF8 hasTokenCaseInsensitive hasTokenCaseInsensitiveOrNull hex hypot if
    ifNull initcap instr isNull kolmogorovSmirnovTest lag last_value
    last_value_respect_nulls lcase lead least left length ln localtime localtimestamp locate
    log log10 log2 lower lpad makeDate makeDate32 makeDateTime makeDateTime64 max max2
    max_by mid midpoint min min2 min_by mod modOrNull monthName normL1 normL2 normL2Squared
    normLinf normLp normalizeL1 normalizeL2 normalizeLinf normalizeLp not now now64
    nth_value ntile nullIf overlay percent_rank pi pmod pmodOrNull position positiveModulo
    positiveModuloOrNull positive_modulo positive_modulo_or_null pow power radians rand rank
    regexpInstr regexp_instr regr_avgx regr_avgy regr_count regr_intercept regr_r2
    regr_slope regr_sxx regr_sxy regr_syy repeat replace reverse right round row_number rpad
    scalarProduct scalarProductTransposed sign sin soundex space sqr sqrt str_to_date
    str_to_map string_agg subDate substr substring sum tan tanh timeDiff timeZone
    time_bucket timestamp timezone toDecimalString to_utc_timestamp today trunc truncate
    ucase unbin unhex unnest upper vectorDifference vectorSum week width_bucket yearweek
    """
)

EXTRA_FUNCTIONS = frozenset({"lambda", "exists", "grouping", "untuple"})

# Longest first: "MergeState" before "State" and "Merge", "ArrayIf"-style chains
# are stripped one suffix at a time.
COMBINATORS = (
    "SimpleState",
    "MergeState",
    "OrDefault",
    "Resample",
    "Distinct",
    "ForEach",
    "ArgMin",
    "ArgMax",
    "OrNull",
    "Array",
    "State",
    "Merge",
    "Map",
    "If",
)

# Table functions (FROM f(...)): generated rows only, nothing outside the query.
TABLE_FUNCTIONS = frozenset({"numbers", "values", "generateSeries", "generate_series"})

# Tables outside the configured database: metadata, counters, this session's
# settings (the limits) and the queries running now (an analyst checks on a long
# one; their texts hold no file contents or secrets, and whoever may run SQL reads
# the whole record anyway). Never rows of another database, the query or text
# logs, server settings and disks (paths), users, roles, grants or quotas.
SYSTEM_TABLES = frozenset(
    {
        "one",
        "processes",
        "settings",
        "numbers",
        "tables",
        "columns",
        "databases",
        "functions",
        "table_functions",
        "data_type_families",
        "parts",
        "data_skipping_indices",
        "metrics",
        "events",
        "asynchronous_metrics",
        "jemalloc_stats",
        "time_zones",
    }
)
INFORMATION_SCHEMA_TABLES = frozenset({"tables", "columns", "schemata", "views"})
